"""Activation sparsity of FFNs, measured the way the Sparsing Law paper (Luo et al., 2024) measures it.

Every mapped FFN computes ``y = W_down a`` with ``a = act(W_gate x) * (W_up x)`` (gated) or ``act(W_up x)``;
``a`` ``[n]`` is the input of the down linear, read here with a forward pre-hook, so this works for every family
CPET maps (SiLU/GLU, ReLU, GELU) and for compressed bases. Neuron ``i`` adds ``a_i W_down[:, i]`` to ``y``; its
*contribution* is ``c_i = |a_i| * ||W_down[:, i]||``. For a threshold ``eps``:

- neuron ``i`` is **active** when ``c_i > eps``; the **activation ratio** is the share of active neurons
  (at ``eps = 0``: the share of non-zero activations, the classic ReLU measure);
- **CETT** (cumulative errors of tail truncation) is ``||sum_{c_i <= eps} a_i W_down[:, i]|| / ||y||``, averaged
  over tokens: the relative error of dropping the inactive neurons. It is 0 at ``eps = 0`` and 1 above the
  largest contribution;
- per layer, the threshold for a target CETT is found by bisection (CETT grows with ``eps``, up to
  cancellation between dropped neurons);
- **PPL-p% sparsity**: the global CETT target whose per-layer thresholds raise perplexity by ``p`` percent
  (bisection on the target), and the activation ratio reached there.

``y`` leaves out the down linear's bias (OPT and Phi have one): CETT is the error of dropping neurons relative to
what the neurons carry, and a layer whose neurons carry nothing is skipped (no division by zero). CETT is a mean
of per-token ratios, so a token with a tiny ``||y||`` weighs as much as any other.

The training-free baseline (:func:`magnitude_thresholds`; TEAL-style, on the down linear's input only, where
TEAL thresholds the input of every projection and CATS the gate's activation) thresholds ``|a_i|`` per layer at
the quantile that keeps a given share of neurons active; :func:`matched_magnitude_baseline` moves that share
until the share measured on the evaluation text matches, so that other methods (PPL-p% sparsity, MoEfication)
are compared with it at the same share of active neurons. :class:`ActivationMask` applies either kind of
threshold while a model runs (dense computation followed by a mask: it measures quality, not speed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .compress.calibration import check_token_windows
from .evaluate import evaluating, model_device, perplexity
from .models import check_context_length, context_length, iter_layer_linears, padding_mask, unwrap
from .recovery import attached_recovery, dequantized_weight

CONTRIBUTION, MAGNITUDE = "contribution", "magnitude"


def _tail_share(acts: torch.Tensor, down: torch.Tensor, contributions: torch.Tensor, output_norms: torch.Tensor,
                eps: float) -> float:
    """CETT of one layer at ``eps``, given its ``[tokens, n]`` contributions and ``[tokens]`` output norms."""
    tail = ((acts * (contributions <= eps)) @ down.T).norm(dim=1)
    keep = output_norms > 0
    return float((tail[keep] / output_norms[keep]).mean()) if keep.any() else 0.0


@dataclass
class FFNActivations:
    """FFN intermediate activations of a model on calibration tokens.

    Attributes:
        acts: per layer ``[tokens, n_layer]`` fp32 (``a``, the down linear's input).
        down: per layer ``[hidden, n_layer]`` fp32 effective down weights.
    """

    acts: list[torch.Tensor]
    down: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.acts)

    @property
    def tokens(self) -> int:
        return self.acts[0].shape[0]

    def column_norms(self, layer: int) -> torch.Tensor:
        """``[n]``: ``||W_down[:, i]||``."""
        return self.down[layer].norm(dim=0)

    def contributions(self, layer: int) -> torch.Tensor:
        """``[tokens, n]``: ``c_i = |a_i| * ||W_down[:, i]||``."""
        return self.acts[layer].abs() * self.column_norms(layer)

    def output_norms(self, layer: int) -> torch.Tensor:
        """``[tokens]``: ``||y||``, the norm of the FFN output of each token."""
        return (self.acts[layer] @ self.down[layer].T).norm(dim=1)

    def cett(self, layer: int, eps: float) -> float:
        """Mean over tokens of ``||tail(eps)|| / ||y||`` (tokens with ``y = 0`` are skipped)."""
        return _tail_share(self.acts[layer], self.down[layer], self.contributions(layer), self.output_norms(layer),
                           eps)

    def activation_ratio(self, layer: int, eps: float = 0.0) -> float:
        """Share of (token, neuron) pairs with ``c_i > eps``."""
        return float((self.contributions(layer) > eps).float().mean())

    def subsample(self, tokens: int | None) -> "FFNActivations":
        """The same measurement on at most ``tokens`` evenly strided tokens (None: all)."""
        if tokens is None or tokens >= self.tokens:
            return self
        step = -(-self.tokens // tokens)
        return FFNActivations([a[::step] for a in self.acts], self.down)

    def threshold_for_cett(self, layer: int, target: float, iterations: int = 24) -> float:
        """The largest ``eps`` (to bisection precision) whose CETT does not exceed ``target`` in ``[0, 1]``."""
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"a CETT target is in [0, 1], got {target}")
        if iterations < 1:
            raise ValueError(f"the threshold bisection needs iterations >= 1, got {iterations}")
        contributions = self.contributions(layer)
        low, high = 0.0, float(contributions.max()) * (1 + 1e-6) + 1e-12
        if target >= 1.0:
            return high
        output_norms = self.output_norms(layer)  # independent of eps: computed once, not per probe
        for _ in range(iterations):
            middle = (low + high) / 2
            if _tail_share(self.acts[layer], self.down[layer], contributions, output_norms, middle) <= target:
                low = middle
            else:
                high = middle
        return low

    def thresholds_for_cett(self, target: float, iterations: int = 24, search_tokens: int | None = 512
                            ) -> list[float]:
        """Per-layer thresholds for ``target``, searched on ``search_tokens`` tokens (each CETT probe is a
        ``[tokens, n] x [n, hidden]`` matmul per layer: on SmolLM2-135M, all 2,048 tokens cost ~2.5 s a layer)."""
        _check_search_tokens(search_tokens)
        sample = self.subsample(search_tokens)
        return [sample.threshold_for_cett(layer, target, iterations) for layer in range(self.num_layers)]


def _check_search_tokens(search_tokens: int | None) -> None:
    if search_tokens is not None and (isinstance(search_tokens, bool) or not isinstance(search_tokens, int)
                                      or search_tokens < 1):
        raise ValueError(f"search_tokens is a number of tokens >= 1 (None: all), got {search_tokens!r}")


def check_report_options(*, cett: float, ppl_p: float | None, search_tokens: int | None,
                         max_tokens: int | None, names: dict[str, str] | None = None) -> None:
    """Refuse options of :func:`sparsity_report` that would fail it after the activations (and the bisections)
    had run, naming the option (``names``: how the caller spells each, e.g. the CLI's flags) and what it takes
    (``cpet sparsity`` calls it before loading the model)."""
    name = {"cett": "cett", "ppl_p": "ppl_p", "max_tokens": "max_tokens", **(names or {})}
    if not 0.0 <= cett <= 1.0:  # also refuses nan
        raise ValueError(f"{name['cett']} is a share of the FFN output norm in [0, 1], got {cett}")
    if ppl_p is not None and not 0 < ppl_p < math.inf:
        raise ValueError(f"{name['ppl_p']} is a perplexity rise in percent (a finite number > 0), got {ppl_p}")
    _check_search_tokens(search_tokens)
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"{name['max_tokens']} must be >= 2 (perplexity scores each token after the first), got "
                         f"{max_tokens}")


PERPLEXITY_WINDOW = 256  # tokens per perplexity window (fewer where the model's context is shorter)


def _perplexity(model: nn.Module, tokenizer, text: str, max_tokens: int | None) -> float:
    """Perplexity of ``text`` in windows of :data:`PERPLEXITY_WINDOW` tokens, or of the model's whole context
    where it is shorter (a fixed 256 refused such a model, after the activations and the bisections)."""
    window = min(PERPLEXITY_WINDOW, context_length(model) or PERPLEXITY_WINDOW)
    return perplexity(model, tokenizer, text, max_length=window, stride=window, max_tokens=max_tokens).ppl


def _down_modules(model: nn.Module) -> list[nn.Module]:
    """Every mapped FFN's down linear (its input is ``a``).

    Raises:
        ValueError: a MoEfied base, whose experts are called directly by the routed block (never through the
            bank's ``forward``): pre-hooks on it would see nothing, and the measures would be empty or wrong;
            a down linear that carries a LoRA (or other peft tuner) or an enabled recovery bypass: its output is
            not ``W_down a``, so the contributions ``|a_i| * ||W_down[:, i]||`` would leave that part out.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .moe.experts import bank_of

    base = unwrap(model)
    downs = [layer["down"] for layer in iter_layer_linears(base)]
    adapted = [i for i, module in enumerate(downs) if isinstance(module, BaseTunerLayer)]
    if adapted:
        raise ValueError(f"the sparsity tools measure the FFNs of a base model, and the down projection of layer "
                         f"{adapted[0]} carries a peft adapter (its output is not W_down a alone): measure the model "
                         "without the adapter, or merge it first (model.merge_and_unload())")
    # a recovery bypass adds bypass(a) to the down linear's output through a forward hook: the same gap as a LoRA
    names = {id(module): name for name, module in base.named_modules()}
    bypassed = {name for recovery in attached_recovery(base).values() if recovery.enabled for name in recovery.targets}
    recovered = [i for i, module in enumerate(downs) if names.get(id(module)) in bypassed]
    if recovered:
        raise ValueError(f"the sparsity tools measure the FFNs of a base model, and the down projection of layer "
                         f"{recovered[0]} carries a recovery bypass (its output is not W_down a alone): measure the "
                         "model without recovery (recovery.detach(), or recovery.enabled = False while measuring)")
    if any(bank_of(module) is not None for module in downs):
        raise ValueError("the sparsity tools measure dense FFNs, and this base is MoEfied (its FFNs run as routed "
                         "experts): measure the model before the MoEfy stage (the source model, or a base compressed "
                         "without MoEfyConfig); the MoEfication benchmark (scripts/bench_moefy.py) measures MoEfied "
                         "bases")
    return downs


@torch.no_grad()
def collect_ffn_activations(model: nn.Module, token_ids: torch.Tensor, *, batch_size: int = 4,
                            progress: bool = False) -> FFNActivations:
    """Run ``token_ids`` ``[n, seq]`` (no padding) through ``model`` and keep every FFN's ``a`` (fp32, CPU).

    Memory: ``n * seq * sum(n_layer) * 4`` bytes (SmolLM2-135M, 2,048 tokens: ~380 MB).
    """
    check_token_windows(token_ids, "token_ids")
    check_context_length(model, token_ids.shape[1], "an activation window", "make shorter windows (--seq-len)")
    downs = _down_modules(model)
    store: list[list[torch.Tensor]] = [[] for _ in downs]
    handles = [module.register_forward_pre_hook(
        lambda module, inputs, i=i: store[i].append(inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).cpu()))
        for i, module in enumerate(downs)]
    device = model_device(model)
    try:
        with evaluating(model):
            for chunk in tqdm(token_ids.split(batch_size), desc="activations", disable=not progress, leave=False):
                model(input_ids=chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return FFNActivations([torch.cat(parts) for parts in store], [dequantized_weight(m).cpu() for m in downs])


def magnitude_thresholds(activations: FFNActivations, active_share: float) -> list[float]:
    """Per-layer ``t`` with a share ``active_share`` of ``|a_i|`` above it on the calibration tokens (TEAL-style)."""
    if not 0.0 < active_share <= 1.0:
        raise ValueError(f"active_share is in (0, 1], got {active_share}")
    out = []
    for acts in activations.acts:
        # torch.quantile takes at most 2**24 values: past that, a sample of whole tokens (rows), so that every
        # neuron is in it (a stride over the flattened [tokens, n] saw only the neurons its stride divides)
        rows = max(1, (1 << 24) // acts.shape[1])
        magnitudes = acts[:: -(-acts.shape[0] // rows)].abs().flatten()
        out.append(float(torch.quantile(magnitudes, 1.0 - active_share)) if active_share < 1 else -1.0)
    return out


class ActivationMask:
    """Zero every FFN activation at or below its layer's threshold while the model runs, counting the active ones.

    ``mode``: ``"contribution"`` compares ``|a_i| * ||W_down[:, i]||`` with the threshold (CETT thresholds),
    ``"magnitude"`` compares ``|a_i|`` (:func:`magnitude_thresholds`); ``column_norms`` (per layer ``[n]``) saves
    dequantizing the down weights again. Use as a context manager; afterwards
    :attr:`active_share` is the share of activations kept over the tokens that ran: positions the model's
    ``attention_mask`` marks as padding are masked like the rest but not counted (a padded batch would
    otherwise count activations of tokens that are not text).
    """

    def __init__(self, model: nn.Module, thresholds: Sequence[float], mode: str = CONTRIBUTION,
                 column_norms: Sequence[torch.Tensor] | None = None):
        downs = _down_modules(model)
        if len(thresholds) != len(downs):
            raise ValueError(f"{len(thresholds)} thresholds for {len(downs)} FFN layers")
        bad = [i for i, t in enumerate(thresholds) if math.isnan(t)]  # nan compares false: it masked everything
        if bad:
            raise ValueError(f"the threshold of layer {bad[0]} is nan: thresholds must be numbers (search them with "
                             "FFNActivations.thresholds_for_cett or magnitude_thresholds)")
        widths = [m.in_features for m in downs]
        if column_norms is not None and [tuple(n.shape) for n in column_norms] != [(w,) for w in widths]:
            raise ValueError(f"column_norms must hold one [n] tensor per FFN layer, n = {widths}; got shapes "
                             f"{[tuple(n.shape) for n in column_norms]} (FFNActivations.column_norms gives them)")
        if mode not in (CONTRIBUTION, MAGNITUDE):
            raise ValueError(f"mode is {CONTRIBUTION!r} or {MAGNITUDE!r}, got {mode!r}")
        self.mode, self.thresholds, self._downs = mode, list(thresholds), downs
        if mode == MAGNITUDE:
            self._norms = [None] * len(downs)
        else:  # ``column_norms``: ``||W_down[:, i]||`` per layer when the caller has them (FFNActivations)
            self._norms = list(column_norms) if column_norms is not None else [
                dequantized_weight(m).norm(dim=0) for m in downs]
        self._model = model
        self._handles: list = []
        self._attended: torch.Tensor | None = None  # [batch, seq] bool of the running forward, None: all
        self.kept, self.total = 0, 0
        self._entered = False

    def _hook(self, layer: int):
        def hook(module, inputs):
            a = inputs[0]
            # in fp32, as the thresholds were searched: in bf16 the mask kept another set than the report counted
            score = a.abs().float()
            if self._norms[layer] is not None:
                score = score * self._norms[layer].to(a.device, torch.float32)
            keep = score > self.thresholds[layer]
            attended = self._attended
            # a: [batch, seq, n], or [batch * seq, n] where the family flattens the tokens (OPT)
            if attended is not None and attended.numel() == keep.shape[:-1].numel():
                attended = attended.to(keep.device).reshape(keep.shape[:-1])
                self.kept += int((keep & attended.unsqueeze(-1)).sum())
                self.total += int(attended.sum()) * keep.shape[-1]
            else:
                self.kept += int(keep.sum())
                self.total += keep.numel()
            return (a * keep,) + tuple(inputs[1:])
        return hook

    def _note_mask(self, module, args, kwargs):
        self._attended = padding_mask(kwargs)

    def __enter__(self) -> "ActivationMask":
        if self._entered:
            raise RuntimeError("this ActivationMask has been applied already: use a new one for another run (its "
                               "counts belong to one run)")
        self._entered = True
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self._downs)]
        self._handles.append(self._model.register_forward_pre_hook(self._note_mask, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active_share(self) -> float:
        return self.kept / self.total if self.total else float("nan")


@dataclass
class PPLPoint:
    """One probe of the PPL-p% search: a global CETT target and what it gave on the evaluation text."""

    cett: float
    ppl: float
    rise_percent: float
    activation_ratio: float


@dataclass
class PPLPResult:
    """PPL-p% sparsity: the probe whose perplexity rise is closest to ``p`` (``points``: every probe, in order).

    ``reached``: that rise lies within ``tolerance`` percentage points of ``p``. False when the probes ran out, or
    when no global CETT target gives such a rise (perplexity need not grow with the target on every model): the
    result is then the closest probe, and not PPL-p% sparsity.
    """

    p: float
    dense_ppl: float
    cett: float
    ppl: float
    rise_percent: float
    activation_ratio: float
    thresholds: list[float]
    points: list[PPLPoint] = field(default_factory=list)
    tolerance: float = 0.1
    reached: bool = True

    @property
    def sparsity(self) -> float:
        return 1.0 - self.activation_ratio


def ppl_p_sparsity(model: nn.Module, tokenizer, activations: FFNActivations, text: str, p: float = 1.0, *,
                   max_tokens: int | None = 2048, tolerance: float = 0.1, max_probes: int = 16,
                   search_tokens: int | None = 512, progress: bool = False) -> PPLPResult:
    """Bisect the global CETT target so that perplexity on ``text`` rises by ``p`` percent over the dense model.

    Per-layer thresholds come from ``activations`` (calibration tokens); perplexity and the activation ratio are
    measured on ``text`` (first ``max_tokens`` tokens) with :class:`ActivationMask`. Stops when the rise is
    within ``tolerance`` percentage points of ``p`` or after ``max_probes``; returns the closest probe.
    """
    if not 0 < p < math.inf:  # also refuses nan
        raise ValueError(f"p is a perplexity rise in percent (a finite number > 0), got {p}")
    if not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance is in percentage points (a finite number >= 0), got {tolerance}")
    if max_probes < 1:
        raise ValueError(f"the search needs max_probes >= 1, got {max_probes}")
    _check_search_tokens(search_tokens)
    dense = _perplexity(model, tokenizer, text, max_tokens)
    norms = [activations.column_norms(layer) for layer in range(activations.num_layers)]
    low, high, points, best = 0.0, 1.0, [], None
    for _ in tqdm(range(max_probes), desc=f"PPL-{p:g}%", disable=not progress, leave=False):
        target = (low + high) / 2
        thresholds = activations.thresholds_for_cett(target, search_tokens=search_tokens)
        with ActivationMask(model, thresholds, column_norms=norms) as mask:
            ppl = _perplexity(model, tokenizer, text, max_tokens)
        point = PPLPoint(target, ppl, 100 * (ppl / dense - 1), mask.active_share)
        points.append(point)
        if best is None or abs(point.rise_percent - p) < abs(best[0].rise_percent - p):
            best = (point, thresholds)
        if abs(point.rise_percent - p) <= tolerance:
            break
        low, high = (target, high) if point.rise_percent < p else (low, target)
    point, thresholds = best
    return PPLPResult(p, dense, point.cett, point.ppl, point.rise_percent, point.activation_ratio, thresholds, points,
                      tolerance, abs(point.rise_percent - p) <= tolerance)


def matched_magnitude_baseline(model: nn.Module, tokenizer, activations: FFNActivations, text: str,
                               active_share: float, *, max_tokens: int | None = 2048, tolerance: float = 0.005,
                               max_probes: int = 6) -> dict:
    """The magnitude-threshold baseline at ``active_share`` of the FFN activations kept *on* ``text``.

    Quantiles from the calibration tokens land a little off on other text, so the share asked of
    :func:`magnitude_thresholds` is corrected by the miss (``share += target - measured``) until the share
    measured on ``text`` is within ``tolerance`` of ``active_share``, or ``max_probes`` ran; the closest probe
    is returned: ``{"method", "target_active_share", "activation_ratio", "ppl", "thresholds", "probes", "reached"}``
    (``reached``: within ``tolerance``; a share a ReLU model cannot give, between its non-zero share and 1, is
    not reached, and the search stops when it would ask for a share it asked before).
    """
    if not 0.0 < active_share <= 1.0:
        raise ValueError(f"active_share is in (0, 1], got {active_share}")
    if not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance is a share (a finite number >= 0), got {tolerance}")
    if max_probes < 1:
        raise ValueError(f"the search needs max_probes >= 1, got {max_probes}")
    asked, best, probes = active_share, None, []
    for _ in range(max_probes):
        thresholds = magnitude_thresholds(activations, asked)
        with ActivationMask(model, thresholds, MAGNITUDE) as mask:
            ppl = _perplexity(model, tokenizer, text, max_tokens)
        probes.append({"asked_share": asked, "activation_ratio": mask.active_share, "ppl": ppl})
        if best is None or abs(mask.active_share - active_share) < abs(best[0]["activation_ratio"] - active_share):
            best = (probes[-1], thresholds)
        if abs(mask.active_share - active_share) <= tolerance:
            break
        asked = min(1.0, max(1e-6, asked + active_share - mask.active_share))
        if any(p["asked_share"] == asked for p in probes):  # going round in circles
            break
    probe, thresholds = best
    return {"method": "per-layer |a| quantile thresholds on the down linear's input (TEAL-style)",
            "target_active_share": active_share, "activation_ratio": probe["activation_ratio"], "ppl": probe["ppl"],
            "thresholds": thresholds, "probes": probes,
            "reached": abs(probe["activation_ratio"] - active_share) <= tolerance}


def sparsity_report(model: nn.Module, tokenizer, calibration: torch.Tensor, text: str, *, cett: float = 0.2,
                    ppl_p: float | None = 1.0, max_tokens: int | None = 2048, search_tokens: int | None = 512,
                    progress: bool = False) -> dict:
    """The whole measurement as a JSON-ready dict.

    Args:
        calibration: ``[n, seq]`` token ids whose activations set the thresholds.
        text: held-out text for perplexity (PPL-p% and the magnitude baseline at the same active share).
        cett: the CETT target of the per-layer report.
        ppl_p: the perplexity rise in percent for PPL-p% sparsity (None: skip the perplexity search).
        search_tokens: calibration tokens the threshold bisections read (ratios and CETT are reported on all).
    Returns:
        ``{"tokens", "cett_target", "layers": [{"layer", "neurons", "nonzero_ratio", "threshold",
        "activation_ratio", "cett"}], "overall": {...}, "ppl_p": {...} | None, "baseline": {...} | None}``.
    """
    check_report_options(cett=cett, ppl_p=ppl_p, search_tokens=search_tokens, max_tokens=max_tokens)
    activations = collect_ffn_activations(model, calibration, progress=progress)
    layers = []
    sample = activations.subsample(search_tokens)
    for layer in tqdm(range(activations.num_layers), desc="CETT thresholds", disable=not progress, leave=False):
        eps = sample.threshold_for_cett(layer, cett)
        layers.append({"layer": layer, "neurons": activations.acts[layer].shape[1],
                       "nonzero_ratio": activations.activation_ratio(layer, 0.0), "threshold": eps,
                       "activation_ratio": activations.activation_ratio(layer, eps),
                       "cett": activations.cett(layer, eps)})
    neurons = sum(entry["neurons"] for entry in layers)
    overall = {key: sum(e[key] * e["neurons"] for e in layers) / neurons
               for key in ("nonzero_ratio", "activation_ratio")}
    report = {"tokens": activations.tokens, "cett_target": cett, "layers": layers, "overall": overall,
              "ppl_p": None, "baseline": None}
    if ppl_p is not None:
        result = ppl_p_sparsity(model, tokenizer, activations, text, ppl_p, max_tokens=max_tokens,
                                search_tokens=search_tokens, progress=progress)
        found = asdict(result)
        found["sparsity"] = result.sparsity
        report["ppl_p"] = found
        if result.activation_ratio > 0:  # a search that found only a probe keeping nothing has no share to match
            baseline = matched_magnitude_baseline(model, tokenizer, activations, text, result.activation_ratio,
                                                  max_tokens=max_tokens)
            report["baseline"] = {**baseline, "rise_percent": 100 * (baseline["ppl"] / result.dense_ppl - 1)}
    return report


def require_matplotlib() -> None:
    """Raise ImportError saying how to install matplotlib (the ``plots`` extra) when it is missing.

    Callers that write the PNG check this before any measurement, so a missing plotting library never costs a run.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the activation-ratio plot needs matplotlib: pip install 'cpet[plots]' (or matplotlib)")


def plot_activation_ratios(report: dict, path: str | Path, title: str = "") -> Path:
    """A PNG of the per-layer activation ratio at the CETT target (and non-zero ratio), written atomically."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .assets import atomic_path

    layers = [entry["layer"] for entry in report["layers"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(layers, [e["nonzero_ratio"] for e in report["layers"]], "o-", label="non-zero activations")
    ax.plot(layers, [e["activation_ratio"] for e in report["layers"]], "s-",
            label=f"active at CETT {report['cett_target']:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("activation ratio")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title or "FFN activation ratio per layer")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


__all__ = ["FFNActivations", "collect_ffn_activations", "magnitude_thresholds", "matched_magnitude_baseline",
           "ActivationMask",
           "ppl_p_sparsity", "PPLPResult", "PPLPoint", "sparsity_report", "plot_activation_ratios",
           "require_matplotlib"]
