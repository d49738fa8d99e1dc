"""Quantized token embeddings and LM head (opt-in: ``QuantizeConfig(embeddings=True)``).

On a 135M-parameter model the fp32 token embedding (tied to the LM head) is most of a 4-bit base. This
quantizes it with bitsandbytes (int8 rows with per-row scales, or 4-bit blocks of 64) and, where the model
ties the LM head to it, keeps them tied: :class:`TiedQuantizedHead` holds no weight of its own and multiplies
by the embedding's quantized tensor, so one tensor serves both (untied, they would cost twice). An untied head
is quantized as a plain bitsandbytes linear.

Why we go around bitsandbytes here: its ``Embedding4bit`` / ``Embedding8bit`` compute lookups from quantized
rows (used as they are) but refuse to be saved (``_save_to_state_dict`` raises), so :class:`QuantizedEmbedding4bit`
and :class:`QuantizedEmbedding8bit` add saving (the same keys ``Linear4bit`` / ``Linear8bitLt`` write) and the
loader fills them with :func:`load_quantized_embeddings`. A base with quantized embeddings reloads only with
CPET's loader: transformers' bitsandbytes integration never quantizes embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantizeConfig, QuantMethod

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size: rows must be whole blocks for row-wise lookups


def _bnb():
    import bitsandbytes as bnb

    return bnb


class _KeepsOutputDtype(nn.Module):
    """A quantized table whose lookups come out in ``self.dtype``; ``.to(dtype)``, ``.half()`` and the like move that
    dtype as they would a float table's (the stored table stays quantized)."""

    dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # what a float tensor of ours would become
        return super()._apply(fn, recurse)


class QuantizedEmbedding4bit(_KeepsOutputDtype):
    """A 4-bit embedding table (``[V, h]``, blocks of 64 along each row; no double quantization, so that a
    lookup dequantizes only the rows it reads). Built by :func:`quantize_embedding`."""

    def __init__(self, weight, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = weight  # bnb Params4bit
        self.num_embeddings, self.embedding_dim = weight.quant_state.shape
        self.dtype = dtype  # of the table it replaces: what the model's next layers take

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        state = self.weight.quant_state
        packed = self.weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
        rows = F.embedding(ids, packed).reshape(-1, 1)
        blocks = self.embedding_dim // state.blocksize
        absmax = F.embedding(ids, state.absmax.view(self.num_embeddings, blocks)).reshape(-1)
        row_state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size((*ids.shape, self.embedding_dim)),
                                              code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                                              dtype=state.dtype)
        return bnb.functional.dequantize_4bit(rows, row_state).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.data if keep_vars else self.weight.data.detach()
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def dequantized(self) -> torch.Tensor:
        return _bnb().functional.dequantize_4bit(self.weight.data, self.weight.quant_state).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight.quant_state.quant_type}"


class QuantizedEmbedding8bit(_KeepsOutputDtype):
    """An int8 embedding table with one fp32 scale per row (``row * SCB / 127``)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # int8 [V, h]
        self.register_buffer("SCB", scales)                       # fp32 [V]
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype  # of the table it replaces: what the model's next layers take

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the scales; ``.to(torch.bfloat16)`` / ``.half()`` leave them fp32 (as bitsandbytes'
        ``Int8Params`` keeps its ``SCB``): a float buffer would be cast, and bf16 scales (8 bits of mantissa) would
        shift every row of the table by up to 0.4%."""
        scales = self._buffers.pop("SCB")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, dtype=scales.dtype, device=scales.device)).device
            self.register_buffer("SCB", scales.to(device))
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).float() * (F.embedding(ids, self.SCB.unsqueeze(1)) / 127.0)
        return rows.to(self.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * (self.SCB.unsqueeze(1) / 127.0)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class TiedQuantizedHead(nn.Module):
    """The LM head of a tied model: ``logits = x @ E^T`` with ``E`` the quantized embedding table.

    Holds no parameter of its own (the embedding is referenced, not registered: one tensor, saved once).
    """

    def __init__(self, embedding: nn.Module):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` in ``x``'s dtype, as the ``nn.Linear`` head it replaces gives them (computed in fp32)."""
        embedding = self.embedding
        if isinstance(embedding, QuantizedEmbedding4bit):
            weight = embedding.weight
            return _bnb().matmul_4bit(x.float(), weight.t(), quant_state=weight.quant_state).to(x.dtype)
        # int8: scale the input-independent way, (x @ W^T) * s per vocab row, in chunks of rows to bound memory
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32, device=x.device)
        for start in range(0, self.out_features, 8192):
            rows = slice(start, start + 8192)
            out[..., rows] = (x.float() @ embedding.weight[rows].float().T) * (embedding.SCB[rows] / 127.0)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({self.out_features} x {self.in_features})"


QUANTIZED_EMBEDDING_TYPES = (QuantizedEmbedding4bit, QuantizedEmbedding8bit, TiedQuantizedHead)  # for is_quantized


def check_embeddings(model: nn.Module, method: str = "nf4") -> None:
    """Refuse embeddings this module cannot quantize faithfully with ``method`` (before any work)."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"the token embedding is a {type(embedding).__name__}, not a plain nn.Embedding (it may "
                         "scale or post-process its output), so it cannot be swapped for a quantized table: quantize "
                         "without embeddings=True")
    head = model.get_output_embeddings()
    if head is not None and type(head) is not nn.Linear:
        raise ValueError(f"the LM head is a {type(head).__name__}, not a plain nn.Linear: quantize without "
                         "embeddings=True")
    if is_tied(model) and head.bias is not None:
        # the tied head computes x E^T from the one quantized table; a bias would be dropped without a word
        raise ValueError("the LM head is tied to the token embedding and has a bias, which the quantized tied head "
                         "does not carry: quantize without embeddings=True")
    if method != "int8" and embedding.embedding_dim % BLOCKSIZE:  # int8 scales per row: any width
        raise ValueError(f"embedding width {embedding.embedding_dim} is not a multiple of {BLOCKSIZE}, the 4-bit "
                         "block size rows must fill: quantize without embeddings=True")


def is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def quantize_embedding(table: torch.Tensor | None, shape: tuple[int, int], method: QuantMethod,
                       dtype: torch.dtype = torch.float32) -> nn.Module:
    """A quantized embedding from ``table`` ``[V, h]`` (None: zeros, a shell the loader fills) whose lookups come
    out in ``dtype`` (the replaced table's: a bf16 model stays bf16 after its embedding)."""
    bnb = _bnb()
    data = (table if table is not None else torch.zeros(shape)).detach().float().cpu().contiguous()
    if method == QuantMethod.INT8:
        scales = data.abs().amax(dim=1).clamp(min=1e-8)
        return QuantizedEmbedding8bit(torch.round(data / scales.unsqueeze(1) * 127).to(torch.int8), scales, dtype)
    weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type=method.value, compress_statistics=False,
                               blocksize=BLOCKSIZE)._quantize("cpu")
    return QuantizedEmbedding4bit(weight, shape[1], dtype)


def quantize_embeddings(model: nn.Module, config: QuantizeConfig, *, from_weights: bool = True) -> None:
    """Swap the token embedding (and the LM head: tied, or quantized as a linear) for quantized ones, in place.

    ``from_weights`` False builds empty shells of the same shapes (the loader fills them).
    """
    from .quantize import _bnb_layer

    embedding = model.get_input_embeddings()
    tied = is_tied(model) or (not from_weights and getattr(model.config, "tie_word_embeddings", False))
    shape = (embedding.num_embeddings, embedding.embedding_dim)
    device = embedding.weight.device
    quantized = quantize_embedding(embedding.weight if from_weights else None, shape, config.method,
                                   embedding.weight.dtype).to(device)
    model.set_input_embeddings(quantized)
    head = model.get_output_embeddings()
    if head is None:
        return
    if tied:
        model.set_output_embeddings(TiedQuantizedHead(quantized))
    else:
        model.set_output_embeddings(_bnb_layer(head, config, head.weight if from_weights else None))


def load_quantized_embeddings(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Fill the quantized embedding of a rebuilt model from ``state`` (popping its keys); returns the names."""
    bnb = _bnb()
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    key = f"{name}.weight"
    if key not in state:
        return []
    if isinstance(embedding, QuantizedEmbedding8bit):
        embedding.weight.data = state.pop(key)
        embedding.SCB.copy_(state.pop(f"{name}.SCB"))
        return [key, f"{name}.SCB"]
    stats = {k[len(key) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
    embedding.weight = bnb.nn.Params4bit.from_prequantized(data=state.pop(key), quantized_stats=stats,
                                                           requires_grad=False, device=embedding.weight.device)
    return [key]


__all__ = ["QuantizedEmbedding4bit", "QuantizedEmbedding8bit", "TiedQuantizedHead", "check_embeddings",
           "quantize_embeddings", "load_quantized_embeddings", "is_tied"]
