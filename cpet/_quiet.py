"""Silence third-party messages that every run printed and that no CPET user can act on.

- bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries at import to download an optional CPU kernel from
  the Hugging Face hub ("Failed to load CPU gemm_4bit_forward from kernels-community ...") and falls back
  to its own kernel; CPET keeps bitsandbytes' canonical 4-bit layout anyway (``keep_4bit_layout``).
- peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on
  every adapter creation; the fix belongs in peft, and the warning says nothing about the user's code.

One more is shown once instead of on every call: bitsandbytes' int8 matmul logs "MatMul8bitLt: inputs will be
cast from torch.float32 to float16" on *every* forward of every int8 layer (thousands of lines per perplexity
run). It states a fact about LLM.int8 worth seeing once; CPET keeps fp32 activations on purpose (fp16 is slow
on CPUs).

Only these exact messages are dropped; everything else from both libraries still shows.
"""

from __future__ import annotations

import logging
import warnings

_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _FirstMessageOnly(_DropMessage):
    """Lets the first record starting with ``prefix`` through and drops the ones after it."""

    def __init__(self, prefix: str):
        super().__init__(prefix)
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def silence_unactionable_warnings() -> None:
    """Install the filters (idempotent: a filter already installed is not added twice)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_KERNEL_MESSAGE))
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstMessageOnly) for f in logger.filters):
        logger.addFilter(_FirstMessageOnly(_INT8_CAST_MESSAGE))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
