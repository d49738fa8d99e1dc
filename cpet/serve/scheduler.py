"""The scheduler: one worker thread, a bounded queue, and continuous batching of generation requests.

Every step the worker (1) takes what arrived: every classification request, and generation requests while the
batch has free rows (the others wait their turn, first in line), (2) answers the classification requests in one
mixed batch (they take no row, so a batch full of generations never holds them back), (3) runs one decode step
for every running sequence, whatever its adapter, and (4) prefills the new generation requests together and
merges their KV caches into the running batch (left-padded to a common length). So a request that arrives while
others generate joins them at the next step: a short request is not held back by a long one, and a stream of new
requests never stalls the running ones (they decode every step). On a sliding-window model (Mistral, Gemma 2) a
newcomer waits instead once the running or its own cache outgrows the window, whose layers no longer keep every
position. Finished sequences leave the batch (their cache rows are dropped) and the next step runs without
them; the cache columns that were padding for every row still running are cut off with them, so the cache is
as long as the longest running row however long the batch has run. A full queue refuses new requests at once
(:class:`QueueFull`, HTTP 429), never blocks.

A request's adapter is resolved once, when it is admitted (:meth:`Engine.resolve`): an unknown name fails that
request alone, and an adapter unloaded or evicted later keeps serving the requests that hold it until they
finish. A stream never sends text that a stop string could still cut off: the end of the text that could be
the start of a stop string is held back until the next tokens decide.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..assembly import LoadedAdapter
from ..models import output_cache
from .engine import Engine, cut_at_stop, next_token


class QueueFull(RuntimeError):
    """The request queue is full: retry later."""


@dataclass
class GenerationRequest:
    """A completion request; ``events`` receives text pieces as they are produced, then None."""

    prompt_ids: list[int]
    adapter: str | LoadedAdapter | None  # a name until admitted, then the adapter it resolved to
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    future: Future = field(default_factory=Future)
    events: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class ClassifyRequest:
    adapter: str | LoadedAdapter  # a name until admitted, then the adapter it resolved to
    text: str
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Running:
    request: GenerationRequest
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    generator: torch.Generator | None = None


class Scheduler:
    """Runs an :class:`Engine` on a worker thread (see the module docstring).

    Args:
        max_queue: requests waiting at most (beyond them :meth:`submit` raises :class:`QueueFull`).
        max_batch: sequences in one step at most (new ones wait in the queue until rows free up).
        on_step: called after every step that ran the model for generation with ``(rows, new tokens, seconds)``
            (metrics): the rows it decoded or prefilled, the tokens it appended to them (a row that ends on an end
            token, :meth:`Engine.end_token_ids`, or was cancelled appends none) and the step's duration.

    Raises:
        ValueError: ``max_queue`` or ``max_batch`` below 1 (checked before the worker starts): a batch of 0 would
            never admit a request, and a queue of 0 would be unbounded, never full.
    """

    def __init__(self, engine: Engine, *, max_queue: int = 64, max_batch: int = 16, on_step=None):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}: it is the most requests "
                                 f"{'decoded together' if name == 'max_batch' else 'waiting'}")
        self.engine, self.max_batch, self.on_step = engine, max_batch, on_step
        self.queue: "queue.Queue" = queue.Queue(maxsize=max_queue)
        self._waiting: deque[GenerationRequest] = deque()  # taken from the queue, waiting for a batch row
        self.running: list[_Running] = []
        self._taken: list = []  # what the current step took from the queue
        self._advanced_rows = 0  # rows the model computed for generation in the current step
        self._cache = None
        self._mask: torch.Tensor | None = None       # [rows, length] 1 = real token
        self._positions: torch.Tensor | None = None  # [rows] position of the next token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpet-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests waiting: in the queue, or taken from it and waiting for a batch row (what /health reports)."""
        return self.queue.qsize() + len(self._waiting)

    def submit(self, request) -> Future:
        full = QueueFull(f"the request queue is full ({self.waiting} waiting, at most {self.queue.maxsize}): "
                         "retry later")
        if self.waiting >= self.queue.maxsize:
            raise full
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise full from None
        return request.future

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # fail the requests in flight, keep serving the next ones
                self._fail_running(exc)
                for request in self._taken:  # taken this step but not answered: never left waiting
                    if not request.future.done():
                        _fail(request, exc)

    def _fail_running(self, error: Exception) -> None:
        for run in self.running:
            self._finish(run, error=error)
        self.running, self._cache = [], None

    def _take(self) -> list:
        """What this step serves: every classification request that arrived (they take no batch row, so a batch
        full of generations never holds them back), and generation requests while rows are free, those that
        waited first; the others wait, in arrival order. Cancelled requests are dropped."""
        taken = []
        room = self.max_batch - len(self.running)
        while self._waiting and room > 0:
            request = self._waiting.popleft()
            if not request.cancelled:
                taken.append(request)
                room -= 1
        self._waiting = deque(r for r in self._waiting if not r.cancelled)
        block = not self.running and not taken and not self._waiting
        while True:
            try:
                request = self.queue.get(timeout=0.05) if block and not taken else self.queue.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                continue
            if isinstance(request, GenerationRequest) and room <= 0:
                self._waiting.append(request)
                continue
            taken.append(request)
            room -= isinstance(request, GenerationRequest)
        return taken

    def _step(self) -> None:
        taken = self._taken = self._take()
        classify = [r for r in taken if isinstance(r, ClassifyRequest)]
        generate = [r for r in taken if isinstance(r, GenerationRequest)]
        if classify:
            self._classify(classify)
        started = time.perf_counter()
        self._advanced_rows = 0  # rows the model computed for generation in this step (counted by _advance)
        new_tokens = 0
        if self.running:  # before the new requests join: the running ones advance every step
            try:
                new_tokens += self._decode()
            except Exception as exc:  # the running rows fail; the new requests still get their own prefill
                self._fail_running(exc)
        if generate:
            new_tokens += self._prefill(generate)
        if not self.running:  # the batch is over: its stacked factors must not keep its adapters alive
            self.engine.release_stacks()
        # the last step of a batch counts too (its rows have left `running` by now)
        if self.on_step is not None and self._advanced_rows:
            self.on_step(self._advanced_rows, new_tokens, time.perf_counter() - started)

    def _admit(self, requests: list) -> list:
        """The requests whose adapter resolves (now held by the request); the others fail alone."""
        admitted = []
        for request in requests:
            try:
                request.adapter = self.engine.resolve(request.adapter)
                if isinstance(request, ClassifyRequest):
                    self.engine.classifier_meta(request.adapter)
            except Exception as exc:
                _fail(request, exc)
            else:
                admitted.append(request)
        return admitted

    def _classify(self, requests: list[ClassifyRequest]) -> None:
        requests = self._admit(requests)
        if not requests:
            return
        try:
            results = self.engine.classify([(r.adapter, r.text) for r in requests])
        except Exception as exc:  # the model failed on this batch
            for request in requests:
                request.future.set_exception(exc)
            return
        for request, result in zip(requests, results):
            request.future.set_result(result)

    def _prefill(self, requests: list[GenerationRequest]) -> int:
        """Prefill the new requests together and merge them into the running batch."""
        requests = self._admit(requests)
        if not requests:
            return 0
        device = next(self.engine.model.parameters()).device
        ids, mask, positions = self.engine.left_padded([r.prompt_ids for r in requests], device)
        if self._cache is not None and not self._joinable(ids.shape[1]):
            self._waiting.extendleft(reversed(requests))  # first in line once the running rows finish
            return 0
        try:
            out = self.engine.forward([r.adapter for r in requests], input_ids=ids, attention_mask=mask,
                                      position_ids=positions, use_cache=True)
        except Exception as exc:
            for r in requests:
                _fail(r, exc)
            return 0
        runs = [_Running(r, generator=torch.Generator(device=device).manual_seed(r.seed)
                         if r.seed is not None else None) for r in requests]
        self._merge(output_cache(out), mask, positions[:, -1] + 1, runs)
        return self._advance(runs, out.logits[:, -1].float(), offset=len(self.running) - len(runs))

    def _joinable(self, new_length: int) -> bool:
        """Whether requests prefilled to ``new_length`` tokens can join the running batch now.

        A sliding-window layer keeps only the last ``window - 1`` keys; once either cache has dropped some, the
        rows no longer line up with one mask, so newcomers wait for the running rows to finish (with the
        4096-token windows of Mistral and Gemma 2, only very long requests ever wait).
        """
        windows = [layer.sliding_window for layer in self._cache.layers if getattr(layer, "is_sliding", False)]
        return not windows or max(self._mask.shape[1], new_length) <= min(windows) - 1

    def _merge(self, cache, mask: torch.Tensor, positions: torch.Tensor, runs: list[_Running]) -> None:
        if self._cache is None:
            self._cache, self._mask, self._positions, self.running = cache, mask, positions, runs
            return
        old, new = self._mask.shape[1], mask.shape[1]
        length = max(old, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            if (mine.keys.shape[-2], theirs.keys.shape[-2]) != (old, new):  # _joinable keeps this from happening
                raise RuntimeError(f"cannot merge KV caches of {mine.keys.shape[-2]} and {theirs.keys.shape[-2]} "
                                   f"positions into a batch whose masks have {old} and {new}")
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
            if hasattr(mine, "cumulative_length"):  # sliding layers size their masks from it, not from the keys
                mine.cumulative_length = length
        self._mask = torch.cat([_left_pad(self._mask, length, dim=1), _left_pad(mask, length, dim=1)])
        self._positions = torch.cat([self._positions, positions])
        self.running = self.running + runs

    def _decode(self) -> int:
        last = torch.tensor([run.tokens[-1] for run in self.running], device=self._mask.device).unsqueeze(1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.running), 1)], dim=1)
        out = self.engine.forward([run.request.adapter for run in self.running], input_ids=last,
                                  attention_mask=self._mask, position_ids=self._positions.unsqueeze(1),
                                  use_cache=True, **{self.engine._cache_key: self._cache})
        self._cache = output_cache(out)
        self._positions = self._positions + 1
        return self._advance(self.running, out.logits[:, -1].float(), offset=0)

    def _advance(self, runs: list[_Running], logits: torch.Tensor, offset: int) -> int:
        """Choose each row's next token, stream it, and drop the rows that are done; returns the tokens appended
        (a row that ends on an end token or was cancelled appends none)."""
        ends = self.engine.end_token_ids()  # the same end tokens as Engine.generate
        self._advanced_rows += len(runs)
        appended = 0
        done = []
        for i, run in enumerate(runs):
            request = run.request
            token = int(next_token(logits[i:i + 1], request.temperature, run.generator))
            if request.cancelled or token in ends:
                done.append((offset + i, run, "stop"))
                continue
            run.tokens.append(token)
            appended += 1
            # decoded as Engine.generate and _finish decode (special tokens left out): streaming the text that
            # _finish returns keeps the pieces joining to exactly the final text
            visible, stopped = cut_at_stop(self.engine.text_of(run.tokens), request.stop)
            ready = len(visible) if stopped else len(visible) - stop_prefix_length(visible, request.stop)
            if ready > run.sent and not visible[:ready].endswith("\ufffd"):  # whole characters only
                request.events.put(visible[run.sent:ready])
                run.sent = ready
            if stopped:
                done.append((offset + i, run, "stop"))
            elif len(run.tokens) >= request.max_tokens:
                done.append((offset + i, run, "length"))
        if done:
            for _, run, reason in done:
                self._finish(run, reason=reason)
            finished = {index for index, _, _ in done}
            keep = [i for i in range(len(self.running)) if i not in finished]
            self.running = [self.running[i] for i in keep]
            if not keep:
                self._cache = None
            else:
                self._cache.batch_select_indices(torch.tensor(keep, device=self._mask.device))
                self._mask, self._positions = self._mask[keep], self._positions[keep]
                self._drop_shared_padding()
        return appended

    def _drop_shared_padding(self) -> None:
        """Cut the leading cache columns that are padding in every running row.

        Rows are left-padded to the longest one when they join, so once that row leaves, the others share a run of
        padding columns. Without this cut a batch that never empties (a steady stream of requests) would keep
        every column it ever had: memory and attention time would grow with uptime, and on a sliding-window
        model newcomers would wait for the batch to drain each time the padded length passed the window.
        Positions are explicit per row (``_positions``), so dropping padding changes no row's outputs.
        """
        real = self._mask.bool().any(dim=0)  # left padding only: the all-padding columns are a prefix
        cut = int(real.int().argmax())
        if cut == 0:
            return
        length = self._mask.shape[1] - cut
        for layer in self._cache.layers:
            stored = layer.keys.shape[-2]  # a full sliding layer keeps fewer than the mask's columns
            if stored > length:
                layer.keys = layer.keys[:, :, stored - length:]
                layer.values = layer.values[:, :, stored - length:]
            if hasattr(layer, "cumulative_length"):  # sliding layers size their masks from it (see _merge)
                layer.cumulative_length = length
        self._mask = self._mask[:, cut:]

    def _finish(self, run: _Running, reason: str = "stop", error: Exception | None = None) -> None:
        request = run.request
        if error is not None:
            request.events.put(None)
            if not request.future.done():
                request.future.set_exception(error)
            return
        text = cut_at_stop(self.engine.text_of(run.tokens), request.stop)[0]
        if len(text) > run.sent:
            request.events.put(text[run.sent:])
        request.events.put(None)
        if not request.future.done():
            request.future.set_result({"text": text, "tokens": len(run.tokens), "finish_reason": reason,
                                       "prompt_tokens": len(request.prompt_ids)})


def _fail(request, error: Exception) -> None:
    """Answer a request that is not running with ``error``; a generation's stream ends at once (its reader then
    finds the error in the future)."""
    if isinstance(request, GenerationRequest):
        request.events.put(None)
    request.future.set_exception(error)


def stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (what a stream must hold back:
    the next tokens may complete the stop, and the text from its start on is then cut off)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


__all__ = ["Scheduler", "GenerationRequest", "ClassifyRequest", "QueueFull"]
