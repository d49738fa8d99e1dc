"""Calibration batches: deterministic random windows of a tokenised corpus."""

from __future__ import annotations

import torch


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
