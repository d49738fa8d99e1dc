"""Mixed-adapter batches on one base equal each adapter alone, as CPET assembles it; the registry's checks."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from cpet.data.prompts import PromptTemplate
from cpet.evaluate import label_logprobs
from cpet.models import iter_layer_linears
from cpet.serve import AdapterError, Engine, UnknownAdapterError
from tests.test_assembly import TUNE, pipeline_with_every_assembly

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 250], [7, 7, 1, 90, 4, 33, 2, 11], [1, 2, 3, 4, 5, 6, 7, 8],
                    [200, 100, 50, 25, 12, 6, 3, 1], [9, 8, 7, 6, 5, 4, 3, 2]])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    pipeline, task = pipeline_with_every_assembly(root)
    engine = Engine.from_pipeline(root / "work")
    for name in ("plain", "shared", "both"):
        engine.registry.load(name, pipeline.adapters()[name])
    return pipeline, engine, root


def test_a_mixed_batch_equals_each_adapter_alone_as_cpet_assembles_it(served):
    pipeline, engine, _ = served
    rows = ["plain", "shared", None, "both", "shared"]
    mixed = engine.forward(rows, input_ids=IDS).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            alone = pipeline.model_for(name)(input_ids=IDS[i:i + 1]).logits[0]
            assert torch.allclose(mixed[i], alone, atol=1e-4), name
    assert torch.allclose(mixed, engine.reference_logits(rows, IDS), atol=1e-5)
    engine.fast = False  # the plain per-adapter loop computes the same
    try:
        assert torch.allclose(engine.forward(rows, input_ids=IDS).logits, mixed, atol=1e-5)
    finally:
        engine.fast = True


def test_linear_and_gelu_per_task_recovery_in_one_batch_match_the_per_adapter_loop(served):
    """Per-task recovery is GELU (the default) or linear (identity) per adapter; the stacked fast path must apply
    each its own activation (it once applied GELU to every per-task stack)."""
    from cpet.assembly import LowRank

    pipeline, engine, _ = served
    generator = torch.Generator().manual_seed(0)
    kinds = {"pt-gelu": True, "pt-linear": False}
    for name, gelu in kinds.items():  # the fixture's per-task B may still be zero (best step 0): give it weight
        adapter = engine.registry.load(name, pipeline.adapters()["both"])
        adapter.per_task = {module: LowRank(f.A, torch.randn(f.B.shape, generator=generator), f.scale, gelu=gelu)
                            for module, f in adapter.per_task.items()}
    try:
        rows, ids = ["pt-gelu", "pt-linear", None, "plain", "pt-linear"], IDS[[0, 0, 2, 3, 4]]
        fast = engine.forward(rows, input_ids=ids).logits
        engine.fast = False
        try:
            loop = engine.forward(rows, input_ids=ids).logits
        finally:
            engine.fast = True
        assert torch.allclose(fast, loop, atol=1e-5)
        assert (fast[1] - fast[0]).abs().max() > 1e-3  # same input: the activation matters, the test can tell
    finally:
        for name in kinds:
            engine.registry.unload(name)


@pytest.mark.parametrize("fast", [True, False])
def test_a_family_that_flattens_its_ffn_input_gets_each_rows_deltas_on_that_rows_tokens(fast):
    """OPT's FFN flattens ``[rows, tokens, d]`` to ``[rows * tokens, d]`` before ``fc1``: a row's factors must still
    reach its tokens only (once they went to the flattened token of the row's index)."""
    from pathlib import Path

    from cpet.assembly import LoadedAdapter, LowRank, module_shapes
    from cpet.models import tiny_model

    base = tiny_model("opt")
    model = base.model.eval()
    shapes = module_shapes(model)
    generator = torch.Generator().manual_seed(0)

    def factors():
        return {name: LowRank(torch.randn(4, shapes[name][0], generator=generator),
                              torch.randn(shapes[name][1], 4, generator=generator) * 0.1, 1.0)
                for name in shapes if name.endswith(("fc1", "fc2", "q_proj"))}

    adapters = [LoadedAdapter("a", Path("."), factors()), LoadedAdapter("b", Path("."), factors())]
    rows = [adapters[0], None, adapters[1], adapters[0]]
    ids = IDS[:4]
    with torch.no_grad():
        engine = Engine(model, "tiny", base.tokenizer)
        engine.fast = fast
        try:
            mixed = engine.forward(rows, input_ids=ids).logits
        finally:
            engine.close()
        modules = dict(model.named_modules())
        for i, adapter in enumerate(rows):  # each row alone, its factors added to every output of the module
            hooks = [modules[name].register_forward_hook(lambda m, inp, out, f=f: out + f(inp[0]).to(out.dtype))
                     for name, f in (adapter.lora.items() if adapter is not None else ())]
            try:
                alone = model(input_ids=ids[i:i + 1]).logits[0]
            finally:
                for hook in hooks:
                    hook.remove()
            assert torch.allclose(mixed[i], alone, atol=1e-4), i
    assert (mixed[0] - model(input_ids=ids[:1]).logits[0]).abs().max() > 1e-2  # the factors matter at all


def test_each_base_linear_runs_once_per_step_whatever_the_adapters(served):
    _, engine, _ = served
    modules = [layer[role] for layer in iter_layer_linears(engine.model) for role in layer.names]
    ran = []  # each linear's own forward, not only the engine's count of its hooks
    for module in modules:
        module.forward = (lambda real, m: lambda *a, **k: ran.append(id(m)) or real(*a, **k))(module.forward, module)
    try:
        for rows in (["plain"] * 5, ["plain", "shared", None, "both", "shared"]):
            engine.base_calls, ran[:] = 0, []
            engine.forward(rows, input_ids=IDS)
            assert engine.base_calls == len(modules)
            assert sorted(ran) == sorted(id(m) for m in modules)  # every linear exactly once
    finally:
        for module in modules:
            del module.forward


def test_the_registry_refuses_bad_adapters_with_what_was_wrong(served, tmp_path):
    pipeline, engine, root = served
    registry = engine.registry
    with pytest.raises(UnknownAdapterError) as unknown:
        engine.forward(["nope"], input_ids=IDS[:1])
    assert unknown.value.name == "nope" and sorted(unknown.value.known) == ["both", "plain", "shared"]
    with pytest.raises(AdapterError, match="is not allowed"):
        registry.load("../escape", pipeline.adapters()["plain"])
    with pytest.raises(AdapterError, match="does not exist"):
        registry.load("missing", tmp_path / "missing")
    with pytest.raises(AdapterError, match="is a file, not a directory: give the adapter's directory"):
        registry.load("a-file", pipeline.adapters()["plain"] / "adapter_config.json")  # was "does not exist"
    broken = tmp_path / "broken"
    shutil.copytree(pipeline.adapters()["plain"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        registry.load("broken", broken)
    other = tmp_path / "other-base"
    shutil.copytree(pipeline.adapters()["plain"], other)
    meta = json.loads((other / "cpet.json").read_text())
    meta["base_id"] = "0" * 64
    (other / "cpet.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="was made for compressed base 000000000000"):
        registry.load("other", other)
    with pytest.raises(AdapterError, match="was made for the original model, and this is compressed base"):
        registry.load("original", pipeline.adapters()["orig"])  # tuned on the unpruned original
    plain_copy = tmp_path / "plain-peft"  # no cpet.json to say the base: the shapes tell
    shutil.copytree(pipeline.adapters()["orig"], plain_copy)
    (plain_copy / "cpet.json").unlink()
    with pytest.raises(AdapterError, match=r"down_proj has LoRA shapes A \(4, 128\), B \(64, 4\); the base linear "
                                           r"is 96 -> 64: an adapter of another base"):
        registry.load("plain-peft", plain_copy)
    assert sorted(registry.names()) == ["both", "plain", "shared"]


def test_lru_eviction_keeps_pinned_adapters_and_root_confines_paths(served, tmp_path):
    pipeline, engine, _ = served
    from cpet.serve import AdapterRegistry

    registry = AdapterRegistry(engine.registry.module_shapes, engine.base_id, capacity=2, has_shared_recovery=True,
                               root=pipeline.work_dir / "adapters")
    registry.load("a", pipeline.adapters()["plain"], pin=True)
    registry.load("b", pipeline.adapters()["shared"])
    registry.get("a")
    registry.load("c", pipeline.adapters()["both"])  # evicts b: the least recently used unpinned one
    assert registry.names() == ["a", "c"]
    lru = AdapterRegistry(engine.registry.module_shapes, engine.base_id, capacity=2, has_shared_recovery=True)
    lru.load("b", pipeline.adapters()["plain"])
    lru.load("c", pipeline.adapters()["shared"])
    lru.get("b")  # used last: c is now the least recently used
    lru.load("d", pipeline.adapters()["both"])
    assert lru.names() == ["b", "d"]  # first-in-first-out would have kept c
    with pytest.raises(AdapterError, match="outside the adapter root"):
        registry.load("d", tmp_path)
    # a directory inside the root whose files link outside it: only the directory was checked, and it loaded
    outside = tmp_path / "outside"
    shutil.copytree(pipeline.adapters()["plain"], outside)
    linked = pipeline.work_dir / "adapters" / "linked" / "adapter"
    linked.mkdir(parents=True)
    try:
        for f in outside.iterdir():
            (linked / f.name).symlink_to(f)
        with pytest.raises(AdapterError, match=r"holds adapter_\w+.\w+, a link to .* outside the adapter root"):
            registry.load("linked", linked)
    finally:
        shutil.rmtree(linked.parent)


def test_a_full_registry_never_evicts_the_adapter_it_loads_and_refuses_without_changing(served):
    pipeline, engine, _ = served
    from cpet.serve import AdapterRegistry

    one = AdapterRegistry(engine.registry.module_shapes, engine.base_id, capacity=1, has_shared_recovery=True)
    one.load("a", pipeline.adapters()["plain"], pin=True)
    with pytest.raises(AdapterError, match=r"cannot load b: capacity is 1 and 1 of the 1 other loaded adapters are "
                                           r"pinned .*--max-adapters"):
        one.load("b", pipeline.adapters()["shared"])
    assert one.names() == ["a"]  # refused: not loaded, and nothing else changed
    import cpet.serve.registry

    read = []
    load_factors = cpet.serve.registry.load_factors
    cpet.serve.registry.load_factors = lambda *args, **kwargs: read.append(args[0]) or load_factors(*args, **kwargs)
    try:
        with pytest.raises(AdapterError, match="cannot load b"):
            one.load("b", pipeline.adapters()["shared"])
    finally:
        cpet.serve.registry.load_factors = load_factors
    assert read == []  # refused before its files were read
    with pytest.raises(AdapterError, match="a is pinned .*unload it first"):  # it was swapped, and kept the pin
        one.load("a", pipeline.adapters()["both"])
    assert one.get("a").directory == pipeline.adapters()["plain"].resolve()
    one.unload("a")
    one.load("a", pipeline.adapters()["plain"])
    one.load("a", pipeline.adapters()["both"])  # replacing a loaded (unpinned) name needs no room
    assert one.names() == ["a"] and one.get("a").per_task  # "both" carries per-task recovery
    two = AdapterRegistry(engine.registry.module_shapes, engine.base_id, capacity=2, has_shared_recovery=True)
    two.load("a", pipeline.adapters()["plain"], pin=True)
    two.load("b", pipeline.adapters()["shared"])
    two.load("c", pipeline.adapters()["both"])  # evicts b, the only unpinned other one; c itself stays
    assert two.names() == ["a", "c"]


def test_a_damaged_recovery_json_is_refused_by_name(served, tmp_path):
    pipeline, engine, _ = served
    both = tmp_path / "both"
    shutil.copytree(pipeline.adapters()["both"], both)
    meta_path = next(both.rglob("recovery.json"))
    meta = json.loads(meta_path.read_text())
    del meta["config"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"recovery.json is damaged \(KeyError: 'config'.*make the recovery again"):
        engine.registry.load("damaged", both)  # was a bare KeyError: a 500 from the server
    assert "damaged" not in engine.registry.names()


def test_an_engine_keeps_no_batchs_adapters_alive_once_the_batch_is_over(served):
    """The stacked factors of the last batch held its adapters (and a per-row copy of their factors): an unloaded
    adapter stayed in memory until a batch of other adapters ran."""
    import gc
    import weakref

    pipeline, engine, _ = served
    engine.registry.load("passing", pipeline.adapters()["both"])
    alive = weakref.ref(engine.registry.get("passing"))
    engine.generate(["the quick"], ["passing"], max_tokens=2)
    engine.classify([("passing", "it was good 3")])
    engine.registry.unload("passing")
    gc.collect()
    assert alive() is None


def test_classification_uses_each_adapters_template_and_matches_cpet_scoring(served):
    pipeline, engine, root = served
    texts = ["it was good 3", "it was awful 7", "it was nice 11"]
    requests = [("plain", texts[0]), ("shared", texts[1]), ("both", texts[2]), ("plain", texts[1])]
    results = engine.classify(requests)
    from cpet.data.tasks import as_task

    task = as_task(str(root / "task.jsonl"))
    for (name, text), result in zip(requests, results):
        assert set(result["probabilities"]) == set(task.labels)
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-5
        alone = engine.classify([(name, text)])[0]
        assert alone["label"] == result["label"]
        assert all(abs(alone["probabilities"][k] - v) < 1e-4 for k, v in result["probabilities"].items())
        meta = json.loads((pipeline.adapters()[name] / "cpet.json").read_text())
        words = [meta["label_words"][label] for label in meta["labels"]]
        prompt = PromptTemplate(meta["template"]).format(text)
        cpet_scores = label_logprobs(pipeline.model_for(name), engine.tokenizer, [prompt], words,
                                     max_prompt_tokens=meta["max_prompt_tokens"])[0]
        expected = dict(zip(meta["labels"], torch.softmax(cpet_scores, -1).tolist()))
        assert all(abs(expected[k] - v) < 1e-4 for k, v in result["probabilities"].items()), name


def test_a_tiny_temperature_samples_the_argmax_and_a_generation_past_the_context_is_refused(served):
    """logits / 1e-40 overflowed to inf and torch.multinomial raised on the NaN probabilities."""
    _, engine, _ = served
    prompts, adapters = ["the quick brown", "a"], ["shared", None]
    greedy = engine.generate(prompts, adapters, max_tokens=4)
    assert engine.generate(prompts, adapters, max_tokens=4, temperature=1e-40, seed=0) == greedy
    # the tiny model has 256 positions: 250 prompt tokens leave room for 6
    with pytest.raises(ValueError, match=r"the prompt \(250 tokens\) and max_tokens \(7\) need 257 positions, more "
                                         r"than this model's context of 256 .*at most 6 tokens"):
        engine.generate(["x" * 250], [None], max_tokens=7)
    assert engine.generate(["x" * 250], [None], max_tokens=6)[0]["tokens"] <= 6


def test_mixed_generation_equals_each_row_alone_and_sampling_is_seeded(served):
    _, engine, _ = served
    prompts = ["the quick brown", "a", "it was good 12 and"]
    adapters = ["shared", None, "both"]
    together = engine.generate(prompts, adapters, max_tokens=6)
    for prompt, adapter, result in zip(prompts, adapters, together):
        assert engine.generate([prompt], [adapter], max_tokens=6)[0] == result
        assert result["tokens"] <= 6
    first = engine.generate(prompts, adapters, max_tokens=6, temperature=1.0, seed=3)
    assert first == engine.generate(prompts, adapters, max_tokens=6, temperature=1.0, seed=3)
    # and it does sample: another seed, or greedy decoding, gives other text (6 tokens of a random model's
    # near-flat distribution: a coincidence across all three rows is out of reach)
    for i, prompt in enumerate(prompts):  # a seeded row samples as it would alone: its neighbours draw nothing of it
        assert engine.generate([prompt], [adapters[i]], max_tokens=6, temperature=1.0, seed=3)[0] == first[i]
    other = engine.generate(prompts, adapters, max_tokens=6, temperature=1.0, seed=4)
    assert [r["text"] for r in other] != [r["text"] for r in first]
    assert [r["text"] for r in first] != [r["text"] for r in together]
    text = together[0]["text"]
    assert len(text) > 2 and together[0]["finish_reason"] == "length" and together[0]["tokens"] == 6
    stopped = engine.generate(prompts[:1], adapters[:1], max_tokens=6, stop=[text[1:3]])[0]  # cut before it, ended
    assert stopped["text"] == text[:text.index(text[1:3])] and stopped["finish_reason"] == "stop"


def test_a_moefied_base_serves_mixed_batches_like_cpet(tmp_path):
    from cpet.compress.moefy import MoEfyConfig
    from cpet.config import QuantizeConfig
    from cpet.models import tiny_model
    from cpet.pipeline import CPET
    from cpet.recovery import RecoveryConfig
    from cpet.train import DistillConfig
    from tests.test_pipeline import write_task

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    task = write_task(tmp_path / "task.jsonl")
    pipeline = CPET(tiny_model("llama"), tmp_path / "work")
    pipeline.compress([MoEfyConfig(num_experts=4, top_k=2), QuantizeConfig("nf4")],
                      calibration=str(tmp_path / "corpus.txt"), calibration_samples=4, seq_len=32, progress=False)
    pipeline.recover(RecoveryConfig(rank=4, alpha=4, activation="identity", init="svd"),
                     DistillConfig(steps=2, seq_len=32), text=str(tmp_path / "corpus.txt"), progress=False)
    original = pipeline.tune(task, on="original", config=TUNE, progress=False, name="orig")
    pipeline.tune(task, config=TUNE, progress=False, name="plain")
    pipeline.tune(task, init="inherit", inherit_from=original, recovery="both", config=TUNE, progress=False,
                  name="both")
    engine = Engine.from_pipeline(tmp_path / "work")
    for name in ("plain", "both"):
        engine.registry.load(name, pipeline.adapters()[name])
    rows = ["both", None, "plain", "both"]
    mixed = engine.forward(rows, input_ids=IDS[:4]).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            alone = pipeline.model_for(name)(input_ids=IDS[i:i + 1]).logits[0]
            assert torch.allclose(mixed[i], alone, atol=1e-4), name


def test_every_factor_is_kept_on_the_bases_device(tmp_path):
    """The shared-recovery path and the expert banks multiply by the factors as they are: read onto the CPU, they
    failed on a base on another device ('meta' stands in for a GPU here: shapes only, any mix with the CPU fails)."""
    from dataclasses import replace

    from cpet.adapters import add_lora
    from cpet.models import tiny_model
    from cpet.recovery import RecoveryConfig, RecoverySet

    loaded = tiny_model("llama")
    recovery = RecoverySet(loaded.model, RecoveryConfig(rank=2, activation="identity"))
    recovery.save(tmp_path / "recovery", {"base_id": "b" * 64})
    peft_model = add_lora(tiny_model("llama").model, rank=2, alpha=4, dropout=0.0, target_roles=("q", "v"))
    peft_model.save_pretrained(str(tmp_path / "plain"))
    engine = Engine(loaded.model.to("meta"), "b" * 64, loaded.tokenizer, shared_recovery=tmp_path / "recovery")
    adapter = engine.registry.load("plain", tmp_path / "plain")
    factors = [*engine.shared.values(), *adapter.lora.values()]
    assert factors and {t.device.type for f in factors for t in (f.A, f.B)} == {"meta"}
    # the shared-recovery path runs for rows whose adapter was trained with it: this one stands for such an adapter
    engine.registry._adapters["plain"] = replace(adapter, shared=True)
    ids = torch.zeros(2, 4, dtype=torch.long, device="meta")
    assert engine.forward(["plain", None], input_ids=ids).logits.shape == (2, 4, loaded.model.config.vocab_size)


def test_the_engine_runs_its_batches_without_autograd(served):
    """Inference: no graph is recorded, whatever a caller's grad mode (a decorator once slipped off forward)."""
    _, engine, _ = served
    seen = []
    handle = engine.model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_grad_enabled()))
    try:
        engine.forward(["plain", None], input_ids=IDS[:2])
    finally:
        handle.remove()
    assert seen == [False]


def test_a_plain_peft_lora_of_the_source_model_is_refused_on_moefied_ffns(tmp_path):
    """A MoEfied base keeps whole-FFN shapes with its neurons permuted into experts: a plain PEFT LoRA of the source
    model (no cpet.json, no base_id) passed every shape check and ran on the wrong neurons (logits 6.1 off the same
    adapter on the source model). Its FFN LoRA is refused, pointing to inheritance; an attention-only one runs."""
    import copy

    from cpet.adapters import add_lora
    from cpet.compress import compress
    from cpet.compress.moefy import MoEfyConfig
    from cpet.models import tiny_model

    model = tiny_model("llama").model.eval()
    tokens = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    base = compress(copy.deepcopy(model), [MoEfyConfig(num_experts=4, top_k=4, router_steps=5)],
                    calibration=tokens, progress=False)
    engine = Engine(base.model, base.base_id)
    for roles, name in ((None, "every-linear"), (("q", "v"), "attention")):
        adapted = add_lora(copy.deepcopy(model), rank=4, alpha=8, dropout=0.0, target_roles=roles)
        for key, parameter in adapted.named_parameters():
            if "lora_B" in key:  # not the zero start: a LoRA that changes the outputs
                parameter.data = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)) * 0.3
        adapted.save_pretrained(str(tmp_path / name))
        if roles is None:
            with pytest.raises(AdapterError, match=r"plain PEFT adapter with a LoRA on model\.layers\.0\.mlp\.\w+_proj, "
                                                   r"whose neurons this base keeps in another order.*--init inherit"):
                engine.load(name, tmp_path / name)
        else:  # attention keeps its order: the adapter computes what it computes on the source model
            engine.load(name, tmp_path / name)
            ids = IDS[:2, :12]
            with torch.no_grad():
                expected = adapted.eval()(input_ids=ids).logits
                assert torch.allclose(engine.view(name)(input_ids=ids).logits, expected, atol=1e-4)


def test_a_pinned_adapter_that_is_least_recently_used_is_not_evicted(served):
    """The LRU test touches its pinned adapter before the load that evicts, so the pinned one was never the least
    recently used there."""
    from cpet.serve import AdapterRegistry

    pipeline, engine, _ = served
    registry = AdapterRegistry(engine.registry.module_shapes, engine.base_id, capacity=2, has_shared_recovery=True)
    registry.load("a", pipeline.adapters()["plain"], pin=True)  # the oldest, and never used again
    registry.load("b", pipeline.adapters()["shared"])
    registry.load("c", pipeline.adapters()["both"])  # least recently used first: a is pinned, so b goes
    assert registry.names() == ["a", "c"] and registry.pinned("a")
    registry.load("d", pipeline.adapters()["plain"])  # a is the oldest again: c goes
    assert registry.names() == ["a", "d"]


@pytest.mark.parametrize("limit", ["64", 64.0, -3, True])
def test_a_damaged_prompt_limit_fails_its_own_classify_requests_at_admission(served, tmp_path, limit):
    """``max_prompt_tokens`` in cpet.json was used unchecked: a string or a float passed admission and then failed
    every request of the mixed batch it joined (TypeError), a negative one cut prompts silently."""
    pipeline, engine, _ = served
    damaged = tmp_path / "damaged"
    shutil.copytree(pipeline.adapters()["plain"], damaged)
    meta = json.loads((damaged / "cpet.json").read_text())
    meta["max_prompt_tokens"] = limit
    (damaged / "cpet.json").write_text(json.dumps(meta))
    engine.registry.load("damaged", damaged)
    try:
        with pytest.raises(ValueError, match=rf"adapter damaged's cpet.json: the adapter records max_prompt_tokens "
                                             rf"{re.escape(repr(limit))} in its cpet.json, not a positive integer"):
            engine.classifier_meta("damaged")
        assert engine.classifier_meta("plain")["max_prompt_tokens"] >= 1  # the others' requests still pass
    finally:
        engine.registry.unload("damaged")


def test_a_loaded_adapter_keeps_its_factors_when_its_files_are_overwritten_in_place(served, tmp_path):
    """Safetensors files are read memory-mapped, and an fp32 factor's ``float()`` is no copy: a loaded adapter's
    factors were the file's pages. Copying a new version over the directory (``cp``, ``shutil.copyfile``: the same
    file, truncated and rewritten) then changed the adapter already loaded, under the requests running with it,
    before any reload (and a file cut shorter than its mapping kills the process with SIGBUS on the next read)."""
    from tests.test_assembly import give_weight

    pipeline, engine, _ = served
    hot, newer = tmp_path / "hot", tmp_path / "newer"
    shutil.copytree(pipeline.adapters()["both"], hot)
    shutil.copytree(pipeline.adapters()["both"], newer)
    give_weight(newer, seed=7)  # another version of the same adapter: same shapes, other factors
    engine.registry.load("hot", hot)
    try:
        loaded = engine.registry.get("hot")
        assert loaded.per_task  # both kinds of file are covered
        factors = {(kind, module): f for kind in ("lora", "per_task") for module, f in getattr(loaded, kind).items()}
        before = {key: (f.A.clone(), f.B.clone()) for key, f in factors.items()}
        logits = engine.forward(["hot", "hot"], input_ids=IDS[:2]).logits
        engine.release_stacks()
        for file in newer.rglob("*.safetensors"):
            shutil.copyfile(file, hot / file.relative_to(newer))  # in place: the same inode
        for key, f in factors.items():
            assert torch.equal(f.A, before[key][0]) and torch.equal(f.B, before[key][1]), key
        assert torch.equal(engine.forward(["hot", "hot"], input_ids=IDS[:2]).logits, logits)
        engine.registry.load("hot", hot)  # a reload reads the new version
        assert not torch.allclose(engine.forward(["hot", "hot"], input_ids=IDS[:2]).logits, logits)
    finally:
        engine.release_stacks()
        engine.registry.unload("hot")
    # the same for the base's shared recovery, read once when the engine starts
    work = tmp_path / "work"
    shutil.copytree(pipeline.work_dir, work, ignore=shutil.ignore_patterns("adapters"))
    other = Engine.from_pipeline(work)
    try:
        shared = {key: (f.A.clone(), f.B.clone()) for key, f in other.shared.items()}
        assert shared
        for file in (work / "recovery").rglob("*.safetensors"):
            file.write_bytes(b"\0" * file.stat().st_size)  # rewritten in place, zeros
        for key, f in other.shared.items():
            assert torch.equal(f.A, shared[key][0]) and torch.equal(f.B, shared[key][1]), key
    finally:
        other.close()
