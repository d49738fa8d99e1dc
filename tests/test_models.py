from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from cpet.models import (
    EMBEDDED,
    TINY_FAMILIES,
    UnsupportedArchitectureError,
    convert_gguf_to_cache,
    decoder_layers,
    family_of,
    geometry,
    layer_linears,
    linear_roles,
    load_base,
    model_fingerprint,
    target_module_suffixes,
    tiny_model,
)
from tests.conftest import real_asset


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_module_map_shapes(family):
    loaded = tiny_model(family)
    geo = geometry(loaded.model)
    assert (geo.num_layers, geo.hidden_size, geo.intermediate_size) == (2, 64, 128)
    kv_width = geo.num_kv_heads * geo.head_dim
    expected = {"q": (geo.num_heads * geo.head_dim, 64), "k": (kv_width, 64), "v": (kv_width, 64),
                "o": (64, geo.num_heads * geo.head_dim), "up": (128, 64), "down": (64, 128)}
    if family_of(loaded.model).gated:
        expected["gate"] = (128, 64)
    for index in range(geo.num_layers):
        linears = layer_linears(loaded.model, index)
        assert {role: tuple(m.weight.shape) for role, m in linears.modules.items()} == expected
        for role, name in linears.names.items():
            assert loaded.model.get_submodule(name) is linears[role]
    assert len(linear_roles(loaded.model)) == len(expected) * geo.num_layers
    assert len(decoder_layers(loaded.model)) == 2


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_runs_and_tokenizer_round_trips(family):
    loaded = tiny_model(family)
    text = "Ünïcode & bytes: 42!"
    batch = loaded.tokenizer([text, "hi"], return_tensors="pt", padding=True)
    assert loaded.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == text
    logits = loaded.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], loaded.model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_per_seed():
    a, b, c = tiny_model("llama", seed=1), tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    assert model_fingerprint(a.model) == model_fingerprint(b.model) != model_fingerprint(c.model)


def test_target_module_suffixes_per_family():
    assert target_module_suffixes(tiny_model("llama").model, ("q", "v")) == ["q_proj", "v_proj"]
    assert target_module_suffixes(tiny_model("opt").model, ("up", "down", "o")) == ["fc1", "fc2", "out_proj"]
    with pytest.raises(ValueError, match="gate"):
        target_module_suffixes(tiny_model("opt").model, ("gate",))


def test_unsupported_architecture_names_supported_ones():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama.*opt"):
        family_of(model)


def test_local_directory_round_trip(tmp_path):
    loaded = tiny_model("qwen2")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_base(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)
    assert model_fingerprint(loaded.model) == model_fingerprint(again.model)


@pytest.mark.parametrize("name, error, message", [
    ("no-such-model", ValueError, "unknown model 'no-such-model'.*smollm2-135m"),
    ("./missing/dir", FileNotFoundError, "does not exist"),
    ("/tmp/definitely/not/here.gguf", FileNotFoundError, "does not exist"),
])
def test_bad_model_names(name, error, message):
    with pytest.raises(error, match=message):
        load_base(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json: not a transformers model$"):
        load_base(str(tmp_path))
    (tmp_path / "pipeline.json").write_text("{}")  # a pipeline given where a model is wanted: point inside it
    with pytest.raises(FileNotFoundError, match=r"it is a CPET pipeline: its compressed base is .*/base"):
        load_base(str(tmp_path))


def test_a_file_that_is_not_gguf_is_named_as_such(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        load_base(str(tmp_path / "weights.bin"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_base(str(path))


@pytest.mark.parametrize("kept", [1_000_000, 3_000_000])  # cut in the metadata (a struct.error), or in the tensors
def test_truncated_gguf_leaves_no_partial_cache(tmp_path, kept):
    wheel = real_asset(EMBEDDED["smollm2-135m"].asset)
    truncated = tmp_path / "trunc.gguf"
    with zipfile.ZipFile(wheel) as archive, archive.open(EMBEDDED["smollm2-135m"].member) as src:
        truncated.write_bytes(src.read(kept))
    out = tmp_path / "cache" / "converted"
    with pytest.raises(ValueError, match=r"could not read GGUF file .*trunc\.gguf .*delete it and run again"):
        convert_gguf_to_cache(truncated, out)
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == []


def test_a_conversion_that_fails_midway_leaves_no_partial_cache(tmp_path, monkeypatch):
    import cpet.models

    class HalfWritten:  # save_pretrained dies after its first file, as on a full disk
        def save_pretrained(self, directory, **kwargs):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"partial")
            raise OSError("No space left on device")

    monkeypatch.setattr(cpet.models, "_load_gguf", lambda path, dtype: (HalfWritten(), None))
    out = tmp_path / "cache" / "converted"
    out.parent.mkdir()
    with pytest.raises(OSError, match="No space left"):
        convert_gguf_to_cache(tmp_path / "model.gguf", out)
    assert list(out.parent.iterdir()) == []  # neither the directory nor a temporary sibling


def fake_embedded_wheel(tmp_path, monkeypatch):
    """A cache in ``tmp_path`` whose embedded SmolLM2 comes from a fake wheel holding b"GGUF bytes"; its spec."""
    import cpet.models

    monkeypatch.setenv("CPET_CACHE", str(tmp_path))
    spec = EMBEDDED["smollm2-135m"]
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(spec.member, b"GGUF bytes")
    monkeypatch.setattr(cpet.models, "fetch_asset", lambda name: wheel)
    return spec


def test_an_embedded_cache_converted_from_another_source_is_converted_again(tmp_path, monkeypatch):
    import cpet.models
    from cpet.models import embedded_source, ensure_embedded

    spec = fake_embedded_wheel(tmp_path, monkeypatch)
    conversions = []

    def convert(gguf_path, out, dtype=torch.float32, source=None):
        conversions.append((Path(gguf_path).read_bytes(), source))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "cpet_source.json").write_text(json.dumps({"gguf": Path(gguf_path).name, **source}))
        return 0.0

    monkeypatch.setattr(cpet.models, "convert_gguf_to_cache", convert)
    cache = tmp_path / "models" / "smollm2-135m"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    # converted by an older CPET (no hash recorded), or from another version of the package
    for record in ({"gguf": Path(spec.member).name}, {**embedded_source("smollm2-135m"), "asset_sha256": "0" * 64}):
        (cache / "cpet_source.json").write_text(json.dumps(record))
        conversions.clear()
        assert ensure_embedded("smollm2-135m") == (cache, {"gguf_convert": 0.0})
        assert conversions == [(b"GGUF bytes", embedded_source("smollm2-135m"))]
    conversions.clear()
    assert ensure_embedded("smollm2-135m") == (cache, {})  # the pinned source's cache: used as it is
    assert conversions == []
    # an extracted GGUF of another size than the wheel's member (cut short) is extracted again, not converted as is
    (cache / "config.json").unlink()
    extracted = tmp_path / "gguf" / f"{embedded_source('smollm2-135m')['asset_sha256'][:12]}-{Path(spec.member).name}"
    extracted.write_bytes(b"GGUF by")
    assert ensure_embedded("smollm2-135m") == (cache, {"gguf_convert": 0.0})
    assert conversions == [(b"GGUF bytes", embedded_source("smollm2-135m"))]


def test_a_damaged_embedded_cache_or_extracted_gguf_is_made_again(tmp_path, monkeypatch):
    """The converted weights were trusted once cpet_source.json named the pinned source: a file cut short failed
    every load naming no file, and `cpet fetch` called it cached; an extracted GGUF was checked by size only, so a
    same-size damaged one converted into wrong weights silently."""
    import cpet.models
    from cpet.models import embedded_source, ensure_embedded

    spec = fake_embedded_wheel(tmp_path, monkeypatch)
    conversions = []

    def convert(gguf_path, out, dtype=torch.float32, source=None):
        conversions.append(Path(gguf_path).read_bytes())
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights!")
        weights = {"model.safetensors": {"size": 8, "sha256": hashlib.sha256(b"weights!").hexdigest()}}
        (out / "cpet_source.json").write_text(json.dumps({"gguf": Path(gguf_path).name, **source,
                                                          "weights": weights}))
        return 0.0

    monkeypatch.setattr(cpet.models, "convert_gguf_to_cache", convert)
    cache, _ = ensure_embedded("smollm2-135m")
    assert conversions == [b"GGUF bytes"]
    conversions.clear()
    assert ensure_embedded("smollm2-135m", verify=True) == (cache, {}) and conversions == []  # intact: used
    (cache / "model.safetensors").write_bytes(b"weigh")  # cut short: converted again on any use
    assert ensure_embedded("smollm2-135m") == (cache, {"gguf_convert": 0.0}) and conversions == [b"GGUF bytes"]
    conversions.clear()
    (cache / "model.safetensors").write_bytes(b"WEIGHTS!")  # the same size, other bytes: `cpet fetch` finds it
    assert ensure_embedded("smollm2-135m") == (cache, {})
    assert ensure_embedded("smollm2-135m", verify=True) == (cache, {"gguf_convert": 0.0})
    conversions.clear()
    extracted = tmp_path / "gguf" / f"{embedded_source('smollm2-135m')['asset_sha256'][:12]}-{Path(spec.member).name}"
    extracted.write_bytes(b"GGUF b\x00tes")  # damaged at the same size: extracted again, not converted as is
    (cache / "config.json").unlink()
    ensure_embedded("smollm2-135m")
    assert conversions == [b"GGUF bytes"] and extracted.read_bytes() == b"GGUF bytes"


def test_embedded_gguf_cache_round_trip_identical_logits(tmp_path):
    """GGUF -> safetensors cache gives the same logits as the GGUF loaded directly (real SmolLM2)."""
    cached = load_base("smollm2-135m")  # converts on first use, then reads the cache
    from cpet.models import embedded_source

    source = embedded_source("smollm2-135m")  # the GGUF the cache was converted from, keyed by the wheel's hash
    gguf_path = Path(cached.path).parent.parent / "gguf" / f"{source['asset_sha256'][:12]}-{source['gguf']}"
    record = json.loads((Path(cached.path) / "cpet_source.json").read_text())
    assert {key: record.get(key) for key in source} == source
    for name, fact in record.get("weights", {}).items():  # recorded since the weights are checked (else None)
        assert (Path(cached.path) / name).stat().st_size == fact["size"]
    direct = load_base(str(gguf_path))
    batch = cached.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(cached.model(**batch).logits, direct.model(**batch).logits)
    geo = geometry(cached.model)
    assert (geo.num_layers, geo.hidden_size, geo.intermediate_size, geo.num_heads, geo.num_kv_heads) == (
        30, 576, 1536, 9, 3)
    assert not getattr(direct.model, "is_quantized", False)


def test_a_hub_id_out_of_reach_is_read_from_the_local_cache_only(monkeypatch):
    """Without network, huggingface_hub retried every request five times: ~50 s before a hub id's error."""
    import socket

    import transformers

    from cpet import hub
    from cpet.models import load_base
    from tests.test_hub import PROXY_VARIABLES

    for name in PROXY_VARIABLES:  # the message names the hub's host only where no proxy stands in front of it
        monkeypatch.delenv(name, raising=False)

    calls = []

    def not_cached(source, **kwargs):
        calls.append((source, kwargs))
        raise OSError("not in the cache")

    def no_route(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", not_cached)
    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(hub, "hub_offline_by_choice", lambda: False)
    assert not hub.hub_reachable()
    with pytest.raises(FileNotFoundError, match=r"'org/model' is a hub id, the hub is out of reach \(huggingface.co "
                                                r"cannot be reached.*not in the local hub cache"):
        load_base("org/model")
    # the adapter-repo check takes its own kwargs: without them it alone retried
    assert calls == [("org/model", {"dtype": torch.float32, "adapter_kwargs": {"local_files_only": True},
                                    "local_files_only": True})]
    calls.clear()
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: SimpleNamespace(close=lambda: None))
    with pytest.raises(OSError, match="not in the cache"):  # reachable: the library's own error, nothing forced
        load_base("org/model")
    assert calls == [("org/model", {"dtype": torch.float32, "adapter_kwargs": {}})]


def test_a_hub_dataset_out_of_reach_is_refused_at_once(monkeypatch):
    import datasets

    from cpet import hub
    from cpet.data.tasks import load_hf_task

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(hub, "hub_offline_by_choice", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets retried the hub"))
    with pytest.raises(ValueError, match=r"'org/data': the hub is out of reach .*HF_HUB_OFFLINE=1"):
        load_hf_task("org/data")


def test_a_saved_4bit_base_loads_in_the_canonical_layout(tmp_path):
    """Loaded with plain from_pretrained, bitsandbytes repacked each 4-bit weight in place at the first forward on
    CPUs with AVX512-BF16: what the sparsity tools then read of the weights was scrambled (column norms off by
    ~9%) and the logits were not CompressedBase.load's."""
    from cpet.compress import CompressedBase, compress
    from cpet.config import QuantizeConfig
    from cpet.models import load_base
    from cpet.recovery import dequantized_weight

    tiny = tiny_model("llama")
    compress(tiny.model, [QuantizeConfig("nf4")], tokenizer=tiny.tokenizer, progress=False).save(tmp_path / "base")
    plain, reference = load_base(str(tmp_path / "base")).model, CompressedBase.load(tmp_path / "base").model
    four_bit = [m for m in plain.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    with torch.no_grad():
        for _ in range(2):  # the repack happened at the first no-grad forward
            assert torch.equal(plain(ids).logits, reference(ids).logits)
    down = plain.model.layers[0].mlp.down_proj
    assert torch.equal(dequantized_weight(down), dequantized_weight(reference.model.layers[0].mlp.down_proj))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_a_saved_quantized_base_loads_in_another_dtype(tmp_path, method):
    """transformers refuses any dtype cast of a bitsandbytes model, so `cpet info BASE --dtype bfloat16` (and any
    load of a quantized base on CUDA, where the dtype defaults to bf16) failed with "You cannot cast a
    bitsandbytes model in a new `dtype`"; the unquantized tensors take the dtype, the packed weights stay."""
    from cpet.compress import compress
    from cpet.config import QuantizeConfig

    tiny = tiny_model("llama")
    compress(tiny.model, [QuantizeConfig(method)], tokenizer=tiny.tokenizer, progress=False).save(tmp_path / "base")
    full = load_base(str(tmp_path / "base"))
    half = load_base(str(tmp_path / "base"), dtype=torch.bfloat16)
    assert half.content_fingerprint() == full.content_fingerprint()  # taken on the weights as stored
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.model.model.norm.weight.dtype == torch.bfloat16
    packed, reference = half.model.model.layers[0].mlp.down_proj.weight, full.model.model.layers[0].mlp.down_proj.weight
    assert packed.dtype == reference.dtype and not packed.is_floating_point()
    assert torch.equal(packed, reference)
    with torch.no_grad():
        logits = half.model(torch.tensor([[5, 17, 99, 3, 42, 8]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_a_model_given_as_a_path_object_is_loaded_under_its_name_as_text(tmp_path):
    """A pathlib.Path (what Python code has at hand) became LoadedBase.name as it was: hub_id_of, and with it every
    adapter a pipeline on that model tuned, failed with "'PosixPath' object has no attribute 'startswith'", and a
    missing path failed so instead of with FileNotFoundError."""
    from cpet.models import hub_id_of

    loaded = tiny_model("llama")
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    again = load_base(tmp_path / "model")
    assert again.name == str(tmp_path / "model") and hub_id_of(again.name) is None
    assert hub_id_of(tmp_path / "model") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base(tmp_path / "missing")
