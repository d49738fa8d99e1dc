"""The scheduler stepped by hand: running requests decode every step, adapters are held from admission on, a
bad request fails alone, and streams never send text that a stop string cuts off."""

from __future__ import annotations

import queue
import re

import pytest

from cpet.serve import UnknownAdapterError
from cpet.serve.scheduler import ClassifyRequest, GenerationRequest, Scheduler, stop_prefix_length
from tests.serve.test_engine import served  # noqa: F401  (the module-scoped pipeline fixture)


class SteppedScheduler(Scheduler):
    """No worker loop: the test calls ``_step`` itself, so what one step does is observable."""

    def _loop(self) -> None:
        return None


def ids_of(engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def streamed(request: GenerationRequest) -> str:
    pieces = []
    while True:
        piece = request.events.get_nowait()
        if piece is None:
            return "".join(pieces)
        pieces.append(piece)


def test_running_requests_decode_every_step_while_new_ones_keep_arriving(served):  # noqa: F811
    _, engine, _ = served
    scheduler = SteppedScheduler(engine, max_batch=4)
    long = GenerationRequest(ids_of(engine, "the quick"), "shared", 40)
    scheduler.submit(long)
    scheduler._step()  # prefill: the first token
    for step in range(10):  # a one-token request arrives before every step and finishes inside it
        short = GenerationRequest(ids_of(engine, f"q{step}"), "plain", 1)
        scheduler.submit(short)
        scheduler._step()
        assert short.future.result(timeout=0)["tokens"] == 1
        assert len(scheduler.running[0].tokens) == step + 2  # the long one advanced in this step too
    while not long.future.done():
        scheduler._step()
    assert not engine._stacks  # the batch is over: its stacked factors no longer hold its adapters
    # decoding before the newcomers join changes nothing in what the long request generates
    assert long.future.result()["text"] == engine.generate(["the quick"], ["shared"], max_tokens=40)[0]["text"]


def test_an_adapter_unloaded_mid_generation_keeps_serving_its_request_and_a_bad_name_fails_alone(served):  # noqa: F811
    pipeline, engine, _ = served
    engine.registry.load("leaving", pipeline.adapters()["both"])
    expected = {name: engine.generate(["the quick"], [name], max_tokens=12)[0]["text"] for name in ("leaving", "plain")}
    scheduler = SteppedScheduler(engine, max_batch=4)
    leaving = GenerationRequest(ids_of(engine, "the quick"), "leaving", 12)
    staying = GenerationRequest(ids_of(engine, "the quick"), "plain", 12)
    unknown = GenerationRequest(ids_of(engine, "the quick"), "never-loaded", 12)
    for request in (leaving, staying, unknown):
        scheduler.submit(request)
    scheduler._step()  # one prefill for all three: the unknown name fails alone
    with pytest.raises(UnknownAdapterError):
        unknown.future.result(timeout=0)
    assert len(scheduler.running) == 2
    engine.registry.unload("leaving")  # while its request is in the batch
    while scheduler.running:
        scheduler._step()
    assert leaving.future.result(timeout=0)["text"] == expected["leaving"]  # it finished with the adapter it held
    assert staying.future.result(timeout=0)["text"] == expected["plain"]
    assert "leaving" not in engine.registry.names()
    late = GenerationRequest(ids_of(engine, "the quick"), "leaving", 4)  # new requests no longer find it
    scheduler.submit(late)
    scheduler._step()
    with pytest.raises(UnknownAdapterError):
        late.future.result(timeout=0)


def test_a_stream_holds_back_text_until_it_cannot_be_the_start_of_a_stop_string(served):  # noqa: F811
    _, engine, _ = served

    def stop_position(full: str) -> int | None:
        """Where a two-character stop whose characters come from two tokens (byte tokenizer, ASCII) first occurs."""
        return next((i for i in range(1, len(full) - 1) if full[:i + 2].isascii() and full.find(full[i:i + 2]) == i),
                    None)

    # the first adapter and prompt whose text has such a place (a random tiny model writes mostly non-ASCII bytes)
    found = ((adapter, prompt, full, stop_position(full))
             for adapter in ("both", "shared", "plain", None) for prompt in ("long one", "the quick", "hello")
             for full in [engine.generate([prompt], [adapter], max_tokens=30)[0]["text"]])
    adapter, prompt, full, i = next((f for f in found if f[3] is not None), (None, None, "", None))
    assert i is not None, "no generated text with an ASCII two-character stop to test"
    scheduler = SteppedScheduler(engine, max_batch=4)
    request = GenerationRequest(ids_of(engine, prompt), adapter, 30, stop=(full[i:i + 2],))
    scheduler.submit(request)
    while not request.future.done():
        scheduler._step()
    result = request.future.result(timeout=0)
    assert result["text"] == full[:i] and result["finish_reason"] == "stop"
    assert streamed(request) == full[:i]  # the stop's first character was never sent


def test_stop_prefix_length_is_the_longest_end_that_starts_a_stop():
    assert stop_prefix_length("hello wor", ("world",)) == 3
    assert stop_prefix_length("hello w", ("world", "xyz")) == 1
    assert stop_prefix_length("hello", ("world",)) == 0
    assert stop_prefix_length("a\n", ("\n\n", "a\nb")) == 2  # the longer candidate wins
    assert stop_prefix_length("", ("ab",)) == 0
    assert stop_prefix_length("abab", ("abac",)) == 2  # "ab" ends the text and starts the stop; "bab" does not
    assert stop_prefix_length("xaba", ("abac",)) == 3


def test_classification_with_a_bad_adapter_fails_alone(served):  # noqa: F811
    _, engine, _ = served
    scheduler = SteppedScheduler(engine)
    good, bad = ClassifyRequest("plain", "a fine day"), ClassifyRequest("missing", "a fine day")
    scheduler.submit(good)
    scheduler.submit(bad)
    scheduler._step()
    assert good.future.result(timeout=0) == engine.classify([("plain", "a fine day")])[0]
    with pytest.raises(UnknownAdapterError):
        bad.future.result(timeout=0)
    with pytest.raises(queue.Empty):
        scheduler.queue.get_nowait()


def test_a_failing_decode_fails_the_running_rows_and_still_serves_the_newcomers(served, monkeypatch):  # noqa: F811
    _, engine, _ = served
    scheduler = SteppedScheduler(engine, max_batch=4)
    running = GenerationRequest(ids_of(engine, "the quick"), "plain", 20)
    scheduler.submit(running)
    scheduler._step()
    newcomer = GenerationRequest(ids_of(engine, "hi"), "shared", 3)
    scheduler.submit(newcomer)
    monkeypatch.setattr(scheduler, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    scheduler._step()  # the decode of the running row fails; the newcomer is prefilled all the same
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        running.future.result(timeout=0)
    streamed(running)  # reads up to the None that ends its stream (queue.Empty if that never came)
    while not newcomer.future.done():
        scheduler._step()
    assert newcomer.future.result(timeout=0)["text"] == engine.generate(["hi"], ["shared"], max_tokens=3)[0]["text"]


def test_whatever_a_failed_step_took_is_answered_not_left_waiting(served, monkeypatch):  # noqa: F811
    """The worker loop's backstop: an error escaping a step fails the requests it took, with a stream end."""
    _, engine, _ = served
    scheduler = SteppedScheduler(engine, max_batch=4)
    request = GenerationRequest(ids_of(engine, "hi"), "plain", 3)
    scheduler.submit(request)
    monkeypatch.setattr(scheduler, "_merge", lambda *args: (_ for _ in ()).throw(RuntimeError("merge failed")))
    monkeypatch.setattr(scheduler._stop, "is_set", iter([False, True]).__next__)  # one turn of the real loop
    Scheduler._loop(scheduler)
    with pytest.raises(RuntimeError, match="merge failed"):
        request.future.result(timeout=0)
    assert request.events.get_nowait() is None


def test_an_adapter_with_a_damaged_cpet_json_fails_its_own_classification_not_the_batch(served, tmp_path):  # noqa: F811
    import json
    import shutil

    pipeline, engine, _ = served
    damages = {"no-slot": {"template": "Text: {txt}\nLabel:"}, "no-word": {"label_words": {}},
               "empty-word": {"label_words": None}, "text-limit": {"max_prompt_tokens": "64"}}
    for name, change in damages.items():
        directory = tmp_path / name
        shutil.copytree(pipeline.adapters()["plain"], directory)
        meta = json.loads((directory / "cpet.json").read_text())
        if name == "no-word":
            change = {"label_words": {label: meta["label_words"][label] for label in meta["labels"][1:]}}
        if name == "empty-word":
            change = {"label_words": {**meta["label_words"], meta["labels"][0]: ""}}
        (directory / "cpet.json").write_text(json.dumps({**meta, **change}))
        engine.registry.load(name, directory)
    try:
        scheduler = SteppedScheduler(engine)
        good = ClassifyRequest("plain", "a fine day")
        bad = {name: ClassifyRequest(name, "a fine day") for name in damages}
        for request in (good, *bad.values()):
            scheduler.submit(request)
        scheduler._step()
        assert good.future.result(timeout=0) == engine.classify([("plain", "a fine day")])[0]
        for name, message in (("no-slot", "has no {text} slot"), ("no-word", "no label word for labels"),
                              ("empty-word", "tokenises to nothing"),
                              ("text-limit", "max_prompt_tokens '64' in its cpet.json, not a positive integer")):
            with pytest.raises(ValueError, match=f"adapter {name}'s cpet.json.*{re.escape(message)}"):
                bad[name].future.result(timeout=0)
    finally:
        for name in damages:
            engine.registry.unload(name)


def test_classification_is_served_while_generations_fill_the_batch(served):  # noqa: F811
    _, engine, _ = served
    scheduler = SteppedScheduler(engine, max_batch=1, max_queue=3)
    running = GenerationRequest(ids_of(engine, "the quick"), "plain", 20)
    scheduler.submit(running)
    scheduler._step()
    waiting = GenerationRequest(ids_of(engine, "hi"), "plain", 2)
    cancelled = GenerationRequest(ids_of(engine, "hi"), "plain", 2)
    classify = ClassifyRequest("plain", "a fine day")
    for request in (waiting, cancelled, classify):
        scheduler.submit(request)
    with pytest.raises(Exception, match="queue is full"):  # waiting requests count, wherever they wait
        scheduler.submit(GenerationRequest(ids_of(engine, "hi"), "plain", 2))
    scheduler._step()  # no free row: the generations wait, the classification is answered
    assert classify.future.result(timeout=0) == engine.classify([("plain", "a fine day")])[0]
    assert len(scheduler.running) == 1 and not waiting.future.done()
    assert scheduler.waiting == 2 and scheduler.queue.empty()  # /health counts the ones waiting for a row
    cancelled.cancelled = True
    while not waiting.future.done():
        scheduler._step()
    assert running.future.result(timeout=0)["tokens"] == 20  # it finished first: one row
    assert waiting.future.result(timeout=0)["text"] == engine.generate(["hi"], ["plain"], max_tokens=2)[0]["text"]
    assert not cancelled.future.done() and not scheduler._waiting and scheduler.queue.empty()


def test_a_tiny_temperature_samples_the_argmax_and_fails_nobody(served):  # noqa: F811
    _, engine, _ = served
    scheduler = SteppedScheduler(engine, max_batch=4)
    other = GenerationRequest(ids_of(engine, "the quick"), "plain", 6)
    scheduler.submit(other)
    scheduler._step()
    tiny = GenerationRequest(ids_of(engine, "the quick"), "plain", 6, temperature=1e-40, seed=0)
    scheduler.submit(tiny)
    while not (other.future.done() and tiny.future.done()):
        scheduler._step()
    greedy = engine.generate(["the quick"], ["plain"], max_tokens=6)[0]["text"]
    assert other.future.result(timeout=0)["text"] == greedy
    assert tiny.future.result(timeout=0)["text"] == greedy


@pytest.mark.parametrize("window", [4096, 6])
def test_newcomers_join_a_sliding_window_model_as_each_request_alone_would_run(window):
    """A sliding layer sizes its mask from its own token count: a merge must set it (a longer newcomer once
    failed every running request); past the window a newcomer waits for the running rows instead."""
    from cpet.models import tiny_model
    from cpet.serve import Engine

    base = tiny_model("mistral", sliding_window=window)
    engine = Engine(base.model, "tiny", base.tokenizer)
    try:
        scheduler = SteppedScheduler(engine, max_batch=4)
        first = GenerationRequest(ids_of(engine, "ab"), None, 8)
        scheduler.submit(first)
        scheduler._step()
        scheduler._step()
        second = GenerationRequest(ids_of(engine, "a much longer prompt here"), None, 8)
        scheduler.submit(second)
        scheduler._step()
        assert len(scheduler.running) == (2 if window == 4096 else 1)  # joined, or waiting past the window
        while not (first.future.done() and second.future.done()):
            scheduler._step()
        for request, prompt in ((first, "ab"), (second, "a much longer prompt here")):
            expected = engine.generate([prompt], [None], max_tokens=8)[0]["text"]
            assert request.future.result(timeout=0)["text"] == expected
    finally:
        engine.close()


@pytest.mark.parametrize("window", [None, 24])  # 24: above any one row (12 + 5 tokens), below the padded batch
def test_a_batch_that_never_empties_keeps_its_cache_as_long_as_its_longest_row(window):
    """Rows join left-padded to the longest; once it leaves, the padding every remaining row shares is cut. A
    steady stream of short requests once grew the cache by a column a step for as long as the batch ran (and on a
    sliding-window model made every newcomer wait for the batch to drain once the padded length passed the
    window)."""
    from cpet.models import tiny_model
    from cpet.serve import Engine

    base = tiny_model("llama") if window is None else tiny_model("mistral", sliding_window=window)
    engine = Engine(base.model, "tiny", base.tokenizer)
    try:
        scheduler = SteppedScheduler(engine, max_batch=4)
        prompts = [("ab", "a longer one")[i % 2] for i in range(20)]
        requests = []
        step = 0
        while len(requests) < len(prompts) or not all(r.future.done() for r in requests):
            if step % 3 == 0 and len(requests) < len(prompts):  # a new request every third step: never empty
                requests.append(GenerationRequest(ids_of(engine, prompts[len(requests)]), None, 5))
                scheduler.submit(requests[-1])
            scheduler._step()
            assert not scheduler._waiting  # every newcomer joined at once
            if scheduler.running:
                longest = int(scheduler._mask.sum(dim=1).max())
                assert scheduler._mask.shape[1] == longest  # no column is padding in every row
                for layer in scheduler._cache.layers:
                    assert layer.keys.shape[-2] == min(longest, window - 1 if window else longest)
            step += 1
        assert step < 70  # 20 requests, one every third step, none waiting
        for prompt in set(prompts):  # cutting padding changes nobody's text
            expected = engine.generate([prompt], [None], max_tokens=5)[0]["text"]
            assert all(r.future.result(timeout=0)["text"] == expected
                       for r, p in zip(requests, prompts) if p == prompt)
    finally:
        engine.close()


def test_waiting_generations_are_admitted_in_arrival_order(served):  # noqa: F811
    _, engine, _ = served
    scheduler = SteppedScheduler(engine, max_batch=1)
    running = GenerationRequest(ids_of(engine, "the quick"), "plain", 2)
    scheduler.submit(running)
    scheduler._step()  # prefill: token 1 of 2
    first = GenerationRequest(ids_of(engine, "hi"), "plain", 1)
    second = GenerationRequest(ids_of(engine, "ho"), "plain", 1)
    scheduler.submit(first)
    scheduler.submit(second)
    scheduler._step()  # no free row: both wait; the running one finishes
    assert running.future.done() and not first.future.done() and not second.future.done()
    scheduler._step()  # a row is free: the first to arrive takes it
    assert first.future.done() and not second.future.done()
    scheduler._step()
    assert second.future.done()


def test_step_metrics_count_the_rows_computed_and_the_tokens_appended(served):  # noqa: F811
    """on_step skipped the last step of every batch (its rows had left ``running``) and counted a row that ended
    on EOS or was cancelled as a generated token."""
    _, engine, _ = served
    steps = []
    scheduler = SteppedScheduler(engine, max_batch=4, on_step=lambda rows, new, seconds: steps.append((rows, new)))
    short, cancelled = (GenerationRequest(ids_of(engine, "the quick"), "plain", 5),
                        GenerationRequest(ids_of(engine, "the quick"), "shared", 50))
    scheduler.submit(short)
    scheduler.submit(cancelled)
    scheduler._step()  # prefill: a token each
    cancelled.cancelled = True
    while not (short.future.done() and cancelled.future.done()):
        scheduler._step()
    generated = short.future.result()["tokens"] + cancelled.future.result()["tokens"]
    assert sum(new for _, new in steps) == generated
    assert steps[0] == (2, 2) and steps[1] == (2, 1)  # the cancelled row was computed, and appended nothing
    assert short.future.result()["tokens"] == 5  # one token a step: steps 0 and 1 above, then the short row alone
    assert steps[2:] == [(1, 1)] * 3  # to the last step, which ends the batch
    scheduler.submit(ClassifyRequest("plain", "a fine day"))
    scheduler._step()
    assert len(steps) == 5  # a classification step generates nothing


def forcing(engine, monkeypatch, tokens: list[int]) -> None:
    """Make the engine's ``n``-th model call (0: the prefill) choose ``tokens[n]`` in every row, greedy: what a
    random tiny model writes is then known, end and special tokens included, in ``Engine.generate`` and the
    scheduler alike (both call ``engine.forward``)."""
    calls = iter(range(len(tokens)))
    original = engine.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        n = next(calls, None)
        if n is not None:
            out.logits[:, -1, tokens[n]] = out.logits.abs().max() * 2 + 100
        return out

    monkeypatch.setattr(engine, "forward", forward)


def generated_both_ways(engine, monkeypatch, tokens: list[int], prompt: str, max_tokens: int, stop=()):
    """``(Engine.generate's result, the scheduler's result, the scheduler's streamed text)`` with ``tokens`` forced."""
    forcing(engine, monkeypatch, tokens)
    direct = engine.generate([prompt], ["plain"], max_tokens=max_tokens, stop=stop)[0]
    forcing(engine, monkeypatch, tokens)
    scheduler = SteppedScheduler(engine)
    request = GenerationRequest(ids_of(engine, prompt), "plain", max_tokens, stop=tuple(stop))
    scheduler.submit(request)
    while not request.future.done():
        scheduler._step()
    return direct, request.future.result(timeout=0), streamed(request)


def test_end_token_ids_are_the_generation_configs_int_or_list_and_the_tokenizers(served, monkeypatch):  # noqa: F811
    _, engine, _ = served
    config = engine.model.generation_config
    eos = engine.tokenizer.eos_token_id
    for declared, expected in (([eos, 65, 66], {eos, 65, 66}), (65, {eos, 65}), (None, {eos}), ([], {eos})):
        monkeypatch.setattr(config, "eos_token_id", declared)
        assert engine.end_token_ids() == frozenset(expected)


def test_generation_stops_at_any_end_token_the_generation_config_lists(served, monkeypatch):  # noqa: F811
    """A Llama-3 style ``generation_config.eos_token_id`` of several tokens ([eos, eot]): generation stopped only
    at the tokenizer's EOS and ran past the others."""
    _, engine, _ = served
    a, b, eot = (engine.tokenizer.convert_tokens_to_ids(c) for c in "ab!")
    forced = [a, b, eot, a, b, a]
    # not an end token: generation runs past it (the forcing works, and this is what it did with a listed one)
    for result in generated_both_ways(engine, monkeypatch, forced, "the quick", 5)[:2]:
        assert (result["text"], result["tokens"], result["finish_reason"]) == ("ab!ab", 5, "length")
    for declared in ([engine.tokenizer.eos_token_id, eot], eot):  # a list, or one int beside the tokenizer's
        monkeypatch.setattr(engine.model.generation_config, "eos_token_id", declared)
        direct, scheduled, stream = generated_both_ways(engine, monkeypatch, forced, "the quick", 5)
        for result in (direct, scheduled):
            assert (result["text"], result["tokens"], result["finish_reason"]) == ("ab", 2, "stop")
        assert stream == "ab"


def test_generated_special_tokens_are_left_out_of_the_text_and_stops_match_across_them(served, monkeypatch):  # noqa: F811
    """As vLLM's default (``skip_special_tokens``): a generated <pad> or <bos> is no text; it still counts as a
    generated token, and a stop string is matched on the text without it, in the stream as in the result."""
    _, engine, _ = served
    tokenizer = engine.tokenizer
    a, b, c, d = (tokenizer.convert_tokens_to_ids(ch) for ch in "abcd")
    forced = [a, tokenizer.pad_token_id, b, tokenizer.bos_token_id, c, d]
    direct, scheduled, stream = generated_both_ways(engine, monkeypatch, forced, "the quick", 6)
    for result in (direct, scheduled):
        assert (result["text"], result["tokens"], result["finish_reason"]) == ("abcd", 6, "length")
    assert stream == "abcd"
    direct, scheduled, stream = generated_both_ways(engine, monkeypatch, forced, "the quick", 6, stop=["bc"])
    for result in (direct, scheduled):
        assert (result["text"], result["finish_reason"]) == ("a", "stop")
    assert stream == "a"
