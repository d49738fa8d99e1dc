"""Silence two third-party messages that every run printed and that no CPET user can act on.

- bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries at import to download an optional CPU kernel from
  the Hugging Face hub ("Failed to load CPU gemm_4bit_forward from kernels-community ...") and falls back
  to its own kernel; CPET keeps bitsandbytes' canonical 4-bit layout anyway (``keep_4bit_layout``).
- peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on
  every adapter creation; the fix belongs in peft, and the warning says nothing about the user's code.

Only these exact messages are dropped; everything else from both libraries still shows.
"""

from __future__ import annotations

import logging
import warnings

_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_unactionable_warnings() -> None:
    """Install the two filters (idempotent: a filter already installed is not added twice)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_KERNEL_MESSAGE))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
