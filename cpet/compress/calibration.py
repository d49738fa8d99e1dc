"""Calibration batches: deterministic random windows of a tokenised corpus."""

from __future__ import annotations

import torch
from torch import nn

from ..models import check_context_length, unwrap


def check_token_windows(ids, what: str = "calibration", allow_empty: bool = False) -> None:
    """Refuse anything but token ids ``[n, seq]`` of integers (n, seq >= 1 unless ``allow_empty``): a ValueError
    naming ``what`` and how to make such windows."""
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point()
            or (ids.numel() == 0 and not allow_empty)):
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be calibration windows [n, seq] of token ids (integers, n and seq >= 1), got "
                         f"{shape}: use calibration_ids(tokenizer, text, n, seq)")


def check_calibration_ids(ids, model) -> None:
    """Refuse calibration given to ``compress`` that no stage could run on, before the first stage runs: not
    windows ``[n, seq]`` of integer ids (n, seq >= 1), or ids outside the model's vocabulary (an empty window
    set used to pass until MoEfication or a Taylor score failed on it, after the stages before had run)."""
    check_token_windows(ids)
    check_context_length(model, ids.shape[1], "a calibration window", "make shorter windows (calibration_ids' seq_len)")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"calibration holds token ids from {low} to {high}, outside this model's vocabulary of "
                         f"{vocab}: make the windows with this model's tokenizer (calibration_ids)")


def calibration_ids(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids: windows at seeded random offsets of the tokenised ``text``.

    Raises:
        ValueError: a text shorter than one window, or non-positive sizes.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


class StopForward(Exception):
    """Raised by a hook of :func:`run_batches` once it has read what it needs: the rest of that chunk's forward
    pass (the later layers, the LM head) is skipped."""


@torch.no_grad()
def run_batches(model: nn.Module, batches: torch.Tensor, handles: list, batch_size: int = 4) -> None:
    """Run ``batches`` ``[n, seq]`` of ids through the causal LM in chunks of ``batch_size``, then remove the hook
    ``handles`` the caller registered to read what it needs (also when the forward fails). A hook may raise
    :class:`StopForward` to end a chunk's pass early. The model runs in eval mode (its training flag restored
    after): statistics read from a model left in train mode carried dropout noise."""
    from ..evaluate import evaluating

    base = unwrap(model)
    try:
        device = next(base.parameters()).device
        with evaluating(base):  # statistics of the model as it will run: no dropout noise in them
            for chunk in batches.split(batch_size):
                try:
                    base(input_ids=chunk.to(device))
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def input_rms(model: nn.Module, batches: torch.Tensor, names: list[str], batch_size: int = 4
              ) -> dict[str, torch.Tensor]:
    """Root-mean-square of each input feature of the named linears over ``batches`` ``[n, seq]`` of ids.

    Used for Wanda importance (pruning) and EoRA-weighted residual SVD (recovery).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    base = unwrap(model)
    for name in names:
        def hook(module, inputs, output, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(base.get_submodule(name).register_forward_hook(hook))
    run_batches(base, batches, handles, batch_size)
    return {name: (sums[name] / counts[name]).sqrt().cpu() for name in names}
