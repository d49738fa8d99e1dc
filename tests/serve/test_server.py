"""The HTTP server with the official openai client, runtime adapter loading, limits and errors; the scheduler."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
from argparse import Namespace
from types import SimpleNamespace

import httpx
import pytest

from cpet.serve.scheduler import GenerationRequest, QueueFull, Scheduler
from cpet.serve.server import pieces
from tests.serve.test_engine import served  # noqa: F401  (the module-scoped pipeline fixture)

KEY = "secret-token"


@pytest.fixture(scope="module")
def server(served):  # noqa: F811
    from cpet.cli.serve import build_app
    from cpet.serve.server import serve_in_thread

    pipeline, _, root = served
    args = Namespace(base=str(pipeline.work_dir), recovery=None, adapter_root=None, served_name="cpet-base",
                     adapter=[f"plain={pipeline.adapters()['plain']}", f"shared={pipeline.adapters()['shared']}"],
                     api_key=KEY, max_adapters=8, max_prompt_tokens=200, max_tokens=64, max_queue=16, max_batch=8,
                     timeout=60.0)
    app = build_app(args)
    url, stop = serve_in_thread(app)
    yield url, app, pipeline, root
    stop()


def test_openai_client_completions_chat_streaming_and_models(server):
    from openai import OpenAI

    from cpet.serve.server import chat_prompt

    url, app, pipeline, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["cpet-base", "plain", "shared"]
    engine = app.state.engine
    for model, adapter in (("plain", "plain"), ("shared", "shared"), ("cpet-base", None)):
        completion = client.completions.create(model=model, prompt="the quick brown", max_tokens=5)
        expected = engine.generate(["the quick brown"], [adapter], max_tokens=5)[0]
        assert completion.choices[0].text == expected["text"] and completion.model == model
        assert completion.usage.completion_tokens == expected["tokens"]
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=4)
        assert chat.choices[0].message.role == "assistant"
        prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content": "hello"}])
        assert prompt == "user: hello\nassistant:"  # the byte tokenizer has no chat template
        assert chat.choices[0].message.content == engine.generate([prompt], [adapter], max_tokens=4)[0]["text"]
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True)]
        assert "".join(pieces) == chat.choices[0].message.content
    streamed = [c.choices[0].text for c in client.completions.create(model="shared", prompt="the quick brown",
                                                                     max_tokens=5, stream=True)]
    assert "".join(streamed) == engine.generate(["the quick brown"], ["shared"], max_tokens=5)[0]["text"]


def test_classification_endpoint(server):
    url, app, _, _ = server
    response = httpx.post(f"{url}/v1/classify", json={"model": "plain", "input": ["it was good 3", "it was bad 4"]})
    assert response.status_code == 200
    data = response.json()["data"]
    assert [d["label"] for d in data] == [r["label"] for r in app.state.engine.classify(
        [("plain", "it was good 3"), ("plain", "it was bad 4")])]


def test_runtime_load_and_unload_need_the_token(server, tmp_path):
    url, _, pipeline, _ = server
    body = {"lora_name": "both", "lora_path": str(pipeline.adapters()["both"])}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=auth)
    assert loaded.status_code == 200 and loaded.json()["rank"] == 4
    assert "both" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert httpx.post(f"{url}/v1/completions", json={"model": "both", "prompt": "hi", "max_tokens": 2}).status_code \
        == 200
    # paths outside the adapter root (the pipeline's adapters/) are refused, names that leave it too
    outside = tmp_path / "elsewhere"
    shutil.copytree(pipeline.adapters()["plain"], outside)
    refused = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside)},
                         headers=auth)
    assert refused.status_code == 400 and "outside the adapter root" in refused.json()["error"]["message"]
    sneaky = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": body["lora_path"]},
                        headers=auth)
    assert sneaky.status_code == 400 and "not allowed" in sneaky.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "both"}).status_code == 401
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "both"}, headers=auth).status_code == 200
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "both"}, headers=auth).status_code == 404


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, tmp_path):
    url, _, pipeline, root = server
    unknown = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404
    assert "known: ['cpet-base', 'plain', 'shared'" in unknown.json()["error"]["message"]
    malformed = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    long = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "word " * 300})
    assert long.status_code == 400 and "over the limit of 200" in long.json()["error"]["message"]
    too_many = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 1000})
    assert too_many.status_code == 400 and "max_tokens must be an integer in 1..64" in too_many.text
    auth = {"Authorization": f"Bearer {KEY}"}
    adapters = root / "work" / "adapters"
    corrupt = adapters / "corrupt" / "adapter"
    shutil.copytree(pipeline.adapters()["plain"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "corrupt", "lora_path": str(corrupt)},
                     headers=auth)
    assert bad.status_code == 400 and "not a readable safetensors file" in bad.json()["error"]["message"]
    other = adapters / "other" / "adapter"
    shutil.copytree(pipeline.adapters()["plain"], other)
    meta = json.loads((other / "cpet.json").read_text())
    (other / "cpet.json").write_text(json.dumps({**meta, "base_id": "f" * 64}))
    foreign = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": str(other)},
                         headers=auth)
    assert foreign.status_code == 400
    assert "was made for compressed base ffffffffffff" in foreign.json()["error"]["message"]
    shutil.rmtree(adapters / "corrupt")
    shutil.rmtree(adapters / "other")
    assert httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 2}).status_code \
        == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert "cpet_queue_depth" in metrics and 'cpet_request_errors_total{status="404"}' in metrics


def test_a_full_queue_answers_429(server, monkeypatch):
    url, app, _, _ = server

    def full(request):
        raise QueueFull("the request queue is full (16 waiting): retry later")

    monkeypatch.setattr(app.state.scheduler, "submit", full)
    response = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi"})
    assert response.status_code == 429 and "retry later" in response.json()["error"]["message"]


def test_the_scheduler_refuses_beyond_its_queue_and_lets_short_requests_pass_long_ones(served):  # noqa: F811
    _, engine, _ = served
    stopped = Scheduler(engine, max_queue=2)
    stopped.close()  # no worker: the queue only fills
    ids = engine.tokenizer("hi", add_special_tokens=False)["input_ids"]
    for _ in range(2):
        stopped.submit(GenerationRequest(ids, None, 4))
    with pytest.raises(QueueFull, match="queue is full"):
        stopped.submit(GenerationRequest(ids, None, 4))

    scheduler = Scheduler(engine, max_queue=8)
    try:
        long = GenerationRequest(engine.tokenizer("the quick", add_special_tokens=False)["input_ids"], "shared", 60)
        scheduler.submit(long)
        long.events.get(timeout=30)  # the long one is generating
        short = GenerationRequest(ids, "plain", 3)
        scheduler.submit(short)
        short_result = short.future.result(timeout=30)
        assert not long.future.done()  # the short request finished first
        long_result = long.future.result(timeout=60)
        # joining a running batch (left-padded caches) gives what each request gives alone
        assert short_result["text"] == engine.generate(["hi"], ["plain"], max_tokens=3)[0]["text"]
        assert long_result["text"] == engine.generate(["the quick"], ["shared"], max_tokens=60)[0]["text"]
    finally:
        scheduler.close()


@pytest.mark.parametrize("flag, value, message", [
    ("--max-batch", "0", "must be >= 1"), ("--max-tokens", "-5", "must be >= 1"), ("--max-queue", "0", "must be >= 1"),
    ("--max-queue", "-1", "must be >= 1"), ("--max-adapters", "0", "must be >= 1"), ("--timeout", "-1", "must be > 0"),
    ("--timeout", "inf", "must be > 0"), ("--port", "70000", r"must be in 0\.\.65535"),
    ("--port", "-1", r"must be in 0\.\.65535"),
])
def test_serve_refuses_bad_limits_and_ports_before_loading_anything(capsys, flag, value, message):
    from cpet.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--base", "no-such-pipeline", flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and re.search(message, err) and "Traceback" not in err


@pytest.mark.parametrize("field, value", [("max_prompt_tokens", 0), ("max_tokens", -5), ("max_queue", 0),
                                          ("max_queue", -1), ("max_batch", 0), ("timeout_s", -1.0),
                                          ("timeout_s", 0), ("timeout_s", float("nan")), ("max_batch", 2.5)])
def test_server_limits_name_the_bad_field_and_value(field, value):
    from cpet.serve.server import ServerLimits

    with pytest.raises(ValueError, match=rf"ServerLimits\.{field} must be .*, got {re.escape(repr(value))}"):
        ServerLimits(**{field: value})
    ServerLimits(max_queue=1, max_batch=1, timeout_s=0.5)  # the smallest sound limits pass


def test_build_app_checks_its_limits_before_the_base_loads(tmp_path, monkeypatch):
    from cpet.cli.serve import build_app
    from cpet.compress import CompressedBase

    (tmp_path / "manifest.json").write_text("{}")  # passes for a base directory until it is loaded

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded before the limits were checked")

    monkeypatch.setattr(CompressedBase, "load", no_load)
    args = Namespace(base=str(tmp_path), recovery=None, adapter_root=None, served_name="cpet-base",
                     adapter=[], api_key=None, max_adapters=8, max_prompt_tokens=200, max_tokens=64, max_queue=16,
                     max_batch=0, timeout=60.0)
    with pytest.raises(ValueError, match=r"max_batch must be an integer >= 1, got 0"):
        build_app(args)
    args.max_batch, args.max_adapters = 8, 0
    with pytest.raises(ValueError, match=r"--max-adapters must be >= 1, got 0"):
        build_app(args)
    args.max_adapters, args.api_key = 8, KEY  # a bare base: runtime loads need a root to stay inside
    with pytest.raises(ValueError, match=r"is a bare base.*give --adapter-root DIR"):
        build_app(args)
    monkeypatch.setenv("CPET_API_KEY", KEY)
    args.api_key = None
    with pytest.raises(ValueError, match=r"is a bare base.*give --adapter-root DIR"):
        build_app(args)
    args.adapter_root = str(tmp_path / "adapters")
    args.adapter = [f"gone={tmp_path / 'missing'}"]  # the operator's adapters are checked before the load too
    with pytest.raises(ValueError, match=r"--adapter gone=.*missing is not an adapter directory"):
        build_app(args)
    args.adapter = ["../x=somewhere"]
    with pytest.raises(ValueError, match=r"the name '\.\./x' is not allowed"):
        build_app(args)
    adapter_dir = tmp_path / "a"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    args.adapter = [f"cpet-base={adapter_dir}"]
    with pytest.raises(ValueError, match=r"'cpet-base' is the bare base's served name"):
        build_app(args)
    args.adapter = [f"a={adapter_dir}", f"a={adapter_dir}"]
    with pytest.raises(ValueError, match=r"'a' is given twice"):
        build_app(args)
    args.adapter, args.max_adapters = [f"a={adapter_dir}", f"b={adapter_dir}"], 1
    with pytest.raises(ValueError, match=r"2 --adapter flags but --max-adapters 1"):
        build_app(args)
    args.adapter, args.max_adapters = [], 8
    with pytest.raises(AssertionError, match="the base was loaded"):  # sound limits and a root: on to the load
        build_app(args)


@pytest.mark.parametrize("kwargs, message", [({"max_batch": 0}, r"max_batch must be >= 1, got 0"),
                                             ({"max_queue": 0}, r"max_queue must be >= 1, got 0")])
def test_the_scheduler_refuses_an_empty_batch_or_queue(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(None, **kwargs)  # refused before the engine is touched or the worker starts


def test_serve_binds_its_port_before_loading_and_says_so_only_once_bound(capsys, monkeypatch):
    import socket

    import uvicorn

    import cpet.cli.serve
    from cpet.cli import main

    loaded = []
    monkeypatch.setattr(cpet.cli.serve, "build_app", lambda args: loaded.append(args) or SimpleNamespace(
        state=SimpleNamespace(engine=SimpleNamespace(registry=SimpleNamespace(names=lambda: ["plain"])))))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--base", "p", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert not loaded and "serving" not in out  # refused before the model loads, and never announced
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(
        [s.getsockname()[1] for s in sockets]) or setattr(self, "started", True))
    assert main(["serve", "--base", "p", "--port", "0"]) == 0  # 0: any free port, the one bound is announced
    (bound,), = ran
    assert loaded and bound != 0 and f"serving p on http://127.0.0.1:{bound} (model names: cpet-base, plain)" \
        in capsys.readouterr().out


def test_chat_prompts_use_the_tokenizers_template_when_it_has_one():
    from cpet.models import byte_tokenizer
    from cpet.serve.server import chat_prompt

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(tokenizer, messages) == "<|system|>be brief<|user|>hi<|assistant|>"


def test_requests_that_would_fail_a_batch_are_refused_before_they_join_it(server):
    """A value that failed inside the scheduler would fail every request of its batch: each is a 400 up front."""
    url, _, pipeline, root = server
    for bad, message in [({"stop": [1]}, "stop must be a string or a list of non-empty strings"),
                         ({"stop": 5}, "stop must be a string or a list"),
                         ({"seed": 2 ** 64}, "seed must be an integer in 0..2**64-1"),
                         ({"seed": True}, "seed must be an integer"),
                         ({"temperature": True}, "temperature must be in [0, 2]"),
                         ({"stream": "false"}, "stream must be true or false, got 'false'"),  # it streamed
                         ({"n": 2}, "n must be 1"),  # one choice came back
                         ({"stop": 0}, "stop must be a string or a list"),  # read as no stop
                         ({"stop": False}, "stop must be a string or a list"),
                         ({"top_p": 0.5}, "top_p is not supported by CPET's server (got 0.5)"),  # were ignored
                         ({"logprobs": 2}, "logprobs is not supported"),
                         ({"echo": True}, "echo is not supported"),
                         ({"presence_penalty": 1.5}, "presence_penalty is not supported"),
                         ({"max_tokens": 4, "max_completion_tokens": 4}, "not both"),
                         ({"max_completion_tokens": 1000}, "max_completion_tokens must be an integer in 1..64")]:
        refused = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", **bad})
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], (bad, refused.text)
    no_role = httpx.post(f"{url}/v1/chat/completions", json={"model": "plain", "messages": [{"content": "hi"}]})
    assert no_role.status_code == 400 and "{role, content}" in no_role.json()["error"]["message"]
    auth = {"Authorization": f"Bearer {KEY}"}
    adapters = root / "work" / "adapters"
    plain_peft = adapters / "peft-only" / "adapter"  # a plain PEFT directory: no cpet.json, so no labels
    shutil.copytree(pipeline.adapters()["plain"], plain_peft)
    (plain_peft / "cpet.json").unlink()
    load = f"{url}/v1/load_lora_adapter"
    assert httpx.post(load, json={"lora_name": "peft-only", "lora_path": str(plain_peft)}, headers=auth).status_code \
        == 200
    unlabelled = httpx.post(f"{url}/v1/classify", json={"model": "peft-only", "input": "it was good"})
    assert unlabelled.status_code == 400 and "not a classification adapter" in unlabelled.json()["error"]["message"]
    not_an_object = adapters / "list-config" / "adapter"
    shutil.copytree(pipeline.adapters()["plain"], not_an_object)
    (not_an_object / "adapter_config.json").write_text("[]")
    listed = httpx.post(load, json={"lora_name": "list-config", "lora_path": str(not_an_object)}, headers=auth)
    assert listed.status_code == 400 and "holds a JSON list, not an object" in listed.json()["error"]["message"]
    unhashable = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": ["x"]}, headers=auth)
    assert unhashable.status_code == 400 and "lora_name" in unhashable.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "peft-only"}, headers=auth).status_code \
        == 200
    shutil.rmtree(adapters / "peft-only")
    shutil.rmtree(adapters / "list-config")
    assert httpx.post(f"{url}/v1/classify", json={"model": "plain", "input": "it was good"}).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 2}).status_code \
        == 200


def test_a_stream_whose_batch_fails_ends_with_an_error_event(server, monkeypatch):
    url, app, _, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(app.state.engine, "forward", broken)
    body = {"model": "plain", "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as response:
        lines = [line for line in response.iter_lines() if line]
    monkeypatch.undo()
    assert response.status_code == 200  # the status line left before the batch ran
    event = json.loads(lines[-1].removeprefix("data: "))
    assert event["error"]["code"] == 500 and "RuntimeError: kernel exploded" in event["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 2}).status_code \
        == 200


def test_sampling_over_http_is_seeded_and_samples(server):
    url, _, _, _ = server

    def text(**fields):
        body = {"model": "plain", "prompt": "the quick brown", "max_tokens": 6, **fields}
        response = httpx.post(f"{url}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    sampled = text(temperature=1.0, seed=3)
    assert sampled == text(temperature=1.0, seed=3)
    assert {text(temperature=1.0, seed=seed) for seed in (4, 5)} | {text()} != {sampled}



def test_a_client_that_leaves_a_stream_frees_its_batch_slot(server, monkeypatch):
    import threading
    import time

    url, app, _, _ = server
    scheduler, engine = app.state.scheduler, app.state.engine
    forward = engine.forward
    started = threading.Event()

    def slow_forward(*args, **kwargs):  # ~64 tokens would take >3 s: the disconnect comes long before the end
        started.set()
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "forward", slow_forward)
    body = {"model": "plain", "prompt": "the quick", "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as response:
        next(line for line in response.iter_lines() if line)  # the first token arrived
        run = scheduler.running[0]
    result = run.request.future.result(timeout=10)  # the client is gone: the request ends early
    monkeypatch.undo()
    assert started.is_set()
    assert result["finish_reason"] == "stop" and result["tokens"] < 32


class Client:
    """Answers ``is_disconnected`` as an ASGI request would: connected for ``stays`` checks, then gone."""

    def __init__(self, stays: int):
        self.stays, self.checks = stays, 0

    async def is_disconnected(self) -> bool:
        self.checks += 1
        return self.checks > self.stays


def streamed(client: Client, request, timeout_s: float = 5.0) -> list[str]:
    async def collect():
        return [piece async for piece in pieces(client, request, timeout_s)]

    return asyncio.run(collect())


def queued_request(*events):
    request = SimpleNamespace(events=queue.Queue(), cancelled=False)
    for event in events:
        request.events.put(event)
    return request


def test_a_stream_notices_a_gone_client_itself_and_cancels_its_request():
    # an ASGI server that keeps the stream open (uvicorn with ASGI 2.4) never cancels it: the stream must look
    request = queued_request("a", "b", "c", "d", None)
    assert streamed(Client(stays=2), request) == ["a", "b"] and request.cancelled
    request = queued_request("a", "b", None)
    assert streamed(Client(stays=100), request) == ["a", "b"] and not request.cancelled


def test_a_stream_with_no_new_token_within_the_timeout_raises_empty():
    with pytest.raises(queue.Empty):
        streamed(Client(stays=10 ** 6), queued_request("a"), timeout_s=0.1)


def test_waiting_for_an_answer_holds_no_worker_thread(server, monkeypatch):
    """Non-streamed requests and the status endpoints run on the event loop: with every worker thread taken (40 by
    default; here none at all), /health and the answers still come."""
    import cpet.serve.server

    async def no_thread(*args):
        raise AssertionError("a worker thread was asked for")

    monkeypatch.setattr(cpet.serve.server, "_in_thread", no_thread)
    import fastapi.routing

    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", no_thread)  # where FastAPI runs a sync endpoint
    url, _, _, _ = server
    for path in ("/health", "/metrics", "/v1/models"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    completion = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "the quick", "max_tokens": 3})
    assert completion.status_code == 200, completion.text
    chat = httpx.post(f"{url}/v1/chat/completions",
                      json={"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    classified = httpx.post(f"{url}/v1/classify", json={"model": "plain", "input": "it was good 3"})
    assert classified.status_code == 200, classified.text


def test_a_wait_ends_at_its_deadline_or_when_the_client_leaves_and_never_cancels_the_future():
    import threading
    import time
    from concurrent.futures import Future
    from concurrent.futures import TimeoutError as FutureTimeout

    from cpet.serve.server import ClientGone, _answered

    answered = SimpleNamespace(future=Future(), cancelled=False)
    threading.Timer(0.05, answered.future.set_result, args=[{"text": "x"}]).start()
    asyncio.run(_answered(answered, time.monotonic() + 5, Client(stays=10 ** 6)))
    assert answered.future.result(timeout=0) == {"text": "x"} and not answered.cancelled
    late = SimpleNamespace(future=Future(), cancelled=False)
    with pytest.raises(FutureTimeout):
        asyncio.run(_answered(late, time.monotonic() + 0.15, None))
    late.future.set_result({"text": "late"})  # the scheduler can still answer it: nothing was cancelled
    gone = SimpleNamespace(future=Future(), cancelled=False)
    with pytest.raises(ClientGone):
        asyncio.run(_answered(gone, time.monotonic() + 5, Client(stays=1)))
    assert gone.cancelled and not gone.future.cancelled()


def test_a_request_past_the_context_is_refused_and_the_batch_keeps_serving(server):
    """A prompt with max_tokens past the tiny model's 256 positions joined the batch; with learned positions its
    IndexError failed every running request."""
    url, _, _, _ = server
    refused = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "x" * 195, "max_tokens": 64})
    assert refused.status_code == 400
    assert "the prompt (195 tokens) and max_tokens (64) need 259 positions, more than this model's context of 256" \
        in refused.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "x" * 195, "max_tokens": 61}
                      ).status_code == 200


def test_a_chat_template_that_refuses_the_messages_is_a_json_400(server, monkeypatch):
    url, app, _, _ = server
    tokenizer = app.state.engine.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{% if m['role'] == 'system' %}"
                        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}",
                        raising=False)
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "plain", "messages": system, "max_tokens": 2})
    assert refused.status_code == 400  # was a plain-text 500 that OpenAI clients cannot parse
    assert "chat template refuses these messages: System role not supported" in refused.json()["error"]["message"]
    user = [{"role": "user", "content": "hi"}]
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": "plain", "messages": user, "max_tokens": 2}
                      ).status_code == 200


def test_any_other_failure_is_a_counted_json_500(server, monkeypatch):
    url, app, _, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app.state.engine.registry, "load", broken)
    failed = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"},
                        headers={"Authorization": f"Bearer {KEY}"})
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": "the server failed on this call: RuntimeError: disk on fire",
                                      "type": "server_error", "code": 500}
    assert 'cpet_request_errors_total{status="500"}' in httpx.get(f"{url}/metrics").text


def test_an_adapter_config_with_a_non_numeric_alpha_is_refused_by_name(server, tmp_path):
    url, _, pipeline, root = server
    adapter = root / "work" / "adapters" / "alpha-text" / "adapter"
    shutil.copytree(pipeline.adapters()["plain"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": str(config["lora_alpha"])}))
    try:
        refused = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "alpha-text", "lora_path": str(adapter)},
                             headers={"Authorization": f"Bearer {KEY}"})
    finally:
        shutil.rmtree(adapter.parent)
    assert refused.status_code == 400  # was a TypeError: a plain-text 500
    assert re.search(r"adapter_config.json: lora_alpha must be a number > 0, got '\d+'",
                     refused.json()["error"]["message"]), refused.text


def test_more_inputs_than_the_queue_holds_is_a_400_not_a_429_to_retry(server):
    url, _, _, _ = server  # the server queues at most 16
    refused = httpx.post(f"{url}/v1/classify", json={"model": "plain", "input": ["it was good"] * 17})
    assert refused.status_code == 400
    assert "holds 17 inputs and the server queues at most 16 (--max-queue)" in refused.json()["error"]["message"]
    many = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": ["hi"] * 17, "max_tokens": 1})
    assert many.status_code == 400 and "holds 17 inputs" in many.text
    assert httpx.post(f"{url}/v1/classify", json={"model": "plain", "input": ["it was good"] * 16}).status_code == 200


def test_a_long_text_is_classified_cut_as_the_adapter_was_trained(server):
    """The raw text was held to --max-prompt-tokens (200 here), though classification cuts it to the adapter's
    own limit as `cpet eval` does: a long email got a 400."""
    url, app, _, _ = server
    text = "it was good " * 100  # 1,200 tokens of the byte tokenizer
    response = httpx.post(f"{url}/v1/classify", json={"model": "plain", "input": text})
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["label"] == app.state.engine.classify([("plain", text)])[0]["label"]


def test_null_fields_take_their_defaults_as_openai_reads_them(server):
    url, _, _, _ = server
    response = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": None,
                                                          "temperature": None, "stream": None, "n": None})
    assert response.status_code == 200, response.text  # max_tokens null was a 400
    assert response.json()["usage"]["completion_tokens"] <= 16


def test_a_refused_chat_call_generates_nothing_and_max_completion_tokens_is_honoured(server, monkeypatch):
    """A chat call with a bad stream value was answered 400 after it had been queued, and then generated its tokens
    for nobody (filling batch rows); max_completion_tokens, the newer name of max_tokens, was ignored."""
    url, app, _, _ = server
    scheduler = app.state.scheduler
    queued = []
    submit = scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda request: queued.append(request) or submit(request))
    messages = [{"role": "user", "content": "hi"}]
    refused = httpx.post(f"{url}/v1/chat/completions",
                         json={"model": "plain", "messages": messages, "stream": "yes", "max_tokens": 64})
    assert refused.status_code == 400 and "stream must be true or false" in refused.json()["error"]["message"]
    assert queued == []
    neutral = {"top_p": 1, "echo": False, "logprobs": None, "presence_penalty": 0}  # sent by clients as defaults
    answered = httpx.post(f"{url}/v1/chat/completions", json={"model": "plain", "messages": messages,
                                                              "max_completion_tokens": 3, **neutral})
    assert answered.status_code == 200, answered.text
    assert len(queued) == 1 and queued[0].max_tokens == 3
    assert answered.json()["usage"]["completion_tokens"] <= 3


def test_a_stream_that_ends_is_counted_in_the_latency_histogram(server):
    """Streamed calls never reached cpet_request_seconds, so /metrics' latency per adapter left them all out."""
    url, _, _, _ = server

    def count(kind: str) -> float:
        found = re.search(rf'cpet_request_seconds_count{{adapter="plain",kind="{kind}"}} ([0-9.]+)',
                          httpx.get(f"{url}/metrics").text)
        return float(found.group(1)) if found else 0.0

    before = count("completion"), count("chat")
    body = {"model": "plain", "max_tokens": 3, "stream": True}
    for path, extra in (("completions", {"prompt": "hi"}), ("chat/completions",
                                                            {"messages": [{"role": "user", "content": "hi"}]})):
        with httpx.stream("POST", f"{url}/v1/{path}", json={**body, **extra}, timeout=20) as response:
            assert response.status_code == 200 and "data: [DONE]" in list(response.iter_lines())
    assert (count("completion"), count("chat")) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("as_list", [True, False], ids=["list", "string"])
def test_the_server_honours_stop_strings(server, as_list):  # noqa: F811
    """No server test sent a stop string that occurs in the text; and one string (OpenAI's API takes a string or a
    list) was refused with a 400, wrapped in a tuple and then required to be a list."""
    url, app, _, _ = server
    engine = app.state.engine
    text = engine.generate(["the quick brown"], ["shared"], max_tokens=6)[0]["text"]
    assert len(text) > 2
    stop = text[1:3]
    expected = engine.generate(["the quick brown"], ["shared"], max_tokens=6, stop=[stop])[0]
    assert expected["finish_reason"] == "stop"
    response = httpx.post(f"{url}/v1/completions", json={"model": "shared", "prompt": "the quick brown",
                                                         "max_tokens": 6, "stop": [stop] if as_list else stop})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == expected["text"] == text[:text.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_a_request_without_max_tokens_fits_a_server_limit_below_the_default(server):
    """The default of 16 was checked against --max-tokens: with a limit of 4, every call that left max_tokens out
    got a 400 naming a value the client never sent."""
    from cpet.serve.server import ServerLimits, create_app, serve_in_thread

    _, app, _, _ = server
    small = create_app(app.state.engine, limits=ServerLimits(max_tokens=4, max_prompt_tokens=200))
    url, stop = serve_in_thread(small)
    try:
        for path, payload in (("completions", {"prompt": "the quick"}),
                              ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            response = httpx.post(f"{url}/v1/{path}", json={"model": "plain", **payload})
            assert response.status_code == 200, response.text
            assert 1 <= response.json()["usage"]["completion_tokens"] <= 4
        too_many = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "x", "max_tokens": 5})
        assert too_many.status_code == 400 and "max_tokens must be an integer in 1..4, got 5" in too_many.text
    finally:
        stop()


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/completions", 405), ("POST", "/v1/embeddings", 404),
                                                  ("POST", "/v1/models", 405)])
def test_unknown_paths_and_methods_get_the_json_error_body_and_are_counted(server, method, path, status):
    """Starlette's own 404 / 405 came back as {"detail": ...} and were not counted, where the README says every
    error is the same JSON body and counted."""
    url, _, _, _ = server

    def counted() -> float:
        found = re.search(rf'cpet_request_errors_total{{status="{status}"}} (\S+)', httpx.get(f"{url}/metrics").text)
        return float(found.group(1)) if found else 0.0

    before = counted()
    response = httpx.request(method, f"{url}{path}")
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == "invalid_request_error"
    assert f"{method} {path}" in error["message"]
    assert counted() == before + 1
    if status == 405:
        assert response.headers["allow"]  # which methods the path takes, as HTTP asks of a 405


def test_oversized_bodies_prompts_and_stop_lists_are_refused_before_any_work(server):
    """A 4 MB prompt was tokenised whole on the event loop (/health waited 4 s, memory grew by 0.8 GB), a list of
    30,000 prompts was tokenised before the queue limit refused it, and 20,000 stop strings slowed every step of
    the batch they joined."""
    url, app, _, _ = server
    calls = []
    tokenizer = app.state.engine.tokenizer
    real = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return real(self, text, *args, **kwargs)

    type(tokenizer).__call__ = counting
    try:
        long = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "word " * 200_000}, timeout=60)
        assert long.status_code == 400 and "the prompt has at least" in long.json()["error"]["message"]
        assert max(calls) <= 64 * 201  # only its head was tokenised
        calls.clear()
        many = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": ["hi"] * 17}, timeout=60)
        assert many.status_code == 400 and "holds 17 inputs" in many.text and calls == []
    finally:
        type(tokenizer).__call__ = real
    stops = httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "stop": ["a", "b", "c", "d",
                                                                                                  "e"]})
    assert stops.status_code == 400 and "stop takes at most 4 strings of at most 256 characters" in stops.text
    huge = httpx.post(f"{url}/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                      headers={"content-type": "application/json"}, timeout=60)
    assert huge.status_code == 413 and "over the server's" in huge.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 2}).status_code \
        == 200


def test_a_queued_request_is_a_use_of_its_adapter_that_lru_eviction_sees(served, monkeypatch):  # noqa: F811
    """A generation's adapter was marked used only when the request joined a batch (a classification's at once):
    while it waited in the queue, a runtime load evicted its adapter as the least recently used, and the request,
    already accepted, ended with a 404 in place of its answer."""
    import threading

    import cpet.serve.server
    from cpet.serve import Engine
    from cpet.serve.server import create_app, serve_in_thread

    gate = threading.Event()

    class Gated(Scheduler):  # holds every request in the queue until the gate opens
        def _step(self):
            gate.wait()
            super()._step()

    pipeline, _, _ = served
    engine = Engine.from_pipeline(pipeline.work_dir, capacity=2)
    engine.registry.load("a", pipeline.adapters()["plain"])
    engine.registry.load("b", pipeline.adapters()["shared"])  # a is the least recently used now
    monkeypatch.setattr(cpet.serve.server, "Scheduler", Gated)
    url, stop = serve_in_thread(create_app(engine, api_key=KEY))
    try:
        body = {"model": "a", "prompt": "the quick", "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as response:
            assert response.status_code == 200  # accepted: it waits in the queue
            loaded = httpx.post(f"{url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                                json={"lora_name": "c", "lora_path": str(pipeline.adapters()["both"])})
            assert loaded.status_code == 200
            assert engine.registry.names() == ["a", "c"]  # b went: a was used since, by the request waiting
            gate.set()
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    finally:
        gate.set()
        stop()
        engine.close()


def test_an_adapter_evicted_just_before_its_classifier_check_is_a_404_not_a_500(server, monkeypatch):
    """The adapter can leave (unloaded, or evicted by another call's load) between the handler's name check and its
    classifier check: the client asked for a model that is not there, a 404 with the usual body, as if it never
    was."""
    url, app, pipeline, _ = server
    engine = app.state.engine
    engine.registry.load("fleeting", pipeline.adapters()["plain"])
    original = engine.classifier_meta

    def evicted_first(adapter):
        if adapter == "fleeting" and "fleeting" in engine.registry.names():
            engine.registry.unload("fleeting")
        return original(adapter)

    monkeypatch.setattr(engine, "classifier_meta", evicted_first)
    response = httpx.post(f"{url}/v1/classify", json={"model": "fleeting", "input": "a fine day"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and error["code"] == 404
    assert error["message"].startswith("unknown model 'fleeting'; known: ['cpet-base'")


def test_build_app_reads_the_base_onto_the_device_the_command_resolved(tmp_path, monkeypatch):
    """``cpet serve --device cuda`` read the base onto the CPU whatever --device said."""
    from cpet.cli.serve import build_app
    from cpet.compress import CompressedBase
    from cpet.runtime import Runtime

    (tmp_path / "manifest.json").write_text("{}")
    asked = {}

    def record_device(directory, device="cpu"):
        asked["device"] = device
        raise RuntimeError("stop after the load")

    monkeypatch.setattr(CompressedBase, "load", record_device)
    args = Namespace(base=str(tmp_path), recovery=None, adapter_root=None, served_name="cpet-base", adapter=[],
                     api_key=None, max_adapters=8, max_prompt_tokens=200, max_tokens=64, max_queue=16, max_batch=8,
                     timeout=60.0, runtime=Runtime(device="meta", dtype=None, threads=1, seed=0))
    with pytest.raises(RuntimeError, match="stop after the load"):
        build_app(args)
    assert asked["device"] == "meta"
    asked.clear()
    args.dtype = "bfloat16"  # a served base keeps its saved dtype: the flag is refused, not silently ignored
    with pytest.raises(ValueError, match=r"--dtype bfloat16: cpet serve runs the base in the dtype it was saved in"):
        build_app(args)
    assert not asked  # before the base loads
