"""The HTTP server with the official openai client, runtime adapter loading, limits and errors; the scheduler."""

from __future__ import annotations

import json
import shutil
from argparse import Namespace

import httpx
import pytest

from cpet.serve.scheduler import GenerationRequest, QueueFull, Scheduler
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
