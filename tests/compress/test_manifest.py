from __future__ import annotations

import json

import pytest
import torch

from cpet.compress import CompressedBase, compress
from cpet.compress.manifest import IndexMaps, Manifest
from cpet.compress.moefy import MoEfyConfig
from cpet.config import PruneConfig, QuantizeConfig, stage_config_from_dict, stage_config_to_dict
from cpet.models import geometry, model_fingerprint, tiny_model


@pytest.mark.parametrize("config", [
    QuantizeConfig(method="fp4", double_quant=False, skip_modules=("lm_head",)),
    PruneConfig(ffn_ratio=0.3, head_ratio=0.5, importance="activation", head_mode="kv_group"),
    PruneConfig(layer_schedule={0: 0.5, 1: 0.1}, importance="magnitude", round_to=8),
    MoEfyConfig(num_experts=8, tau=0.7, top_k=6, clustering="coactivation"),
])
def test_stage_configs_round_trip_through_json(config):
    data = json.loads(json.dumps(stage_config_to_dict(config)))
    assert stage_config_from_dict(data) == config


@pytest.mark.parametrize("written, canonical", [
    (PruneConfig(ffn_ratio=0, head_ratio=0.5, round_to=2.0), PruneConfig(ffn_ratio=0.0, head_ratio=0.5, round_to=2)),
    (MoEfyConfig(num_experts=8.0, tau=1, router_lr=1), MoEfyConfig(num_experts=8, tau=1.0, router_lr=1.0)),
])
def test_equal_settings_written_differently_are_one_config_with_one_dict(written, canonical):
    """``0`` and ``0.0`` are one setting; JSON writes them differently, and the base_id hashes that JSON."""
    assert written == canonical
    assert json.dumps(stage_config_to_dict(written)) == json.dumps(stage_config_to_dict(canonical))


@pytest.mark.parametrize("make, message", [
    (lambda: PruneConfig(ffn_ratio="0.5"), "ffn_ratio must be a number, got '0.5'"),
    (lambda: PruneConfig(ffn_ratio=0.5, round_to=2.5), "round_to must be a whole number, got 2.5"),
    (lambda: MoEfyConfig(num_experts=8, top_k=True), "top_k must be a number, got True"),
])
def test_a_setting_of_the_wrong_type_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_stage_dict():
    with pytest.raises(ValueError, match="unknown compression stage 'sparsify'"):  # no stage has this name
        stage_config_from_dict({"stage": "sparsify"})
    with pytest.raises(ValueError, match=r"no fields \['bits'\]"):
        stage_config_from_dict({"stage": "quantize", "bits": 3})


def test_manifest_round_trip_and_source_identity():
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], source_name="tiny",
                    progress=False)
    again = Manifest.from_json(base.manifest.to_json())
    assert again == base.manifest
    assert again.source == {"name": "tiny", "fingerprint": model_fingerprint(loaded.model), "model_type": "llama"}
    assert again.geometry_before["intermediate_size"] == 128 and again.geometry_after["intermediate_size"] == 64
    assert again.stages[0].params_after < again.stages[0].params_before


def test_base_id_changes_with_every_stage_config_and_source():
    loaded = tiny_model("llama")
    ids = {}
    for name, stages in {
        "a": [PruneConfig(ffn_ratio=0.5, importance="magnitude")],
        "b": [PruneConfig(ffn_ratio=0.25, importance="magnitude")],
        "c": [PruneConfig(ffn_ratio=0.5, importance="magnitude", round_to=2)],
        "d": [PruneConfig(ffn_ratio=0.5, importance="magnitude"), QuantizeConfig("nf4")],
        "e": [PruneConfig(ffn_ratio=0.5, importance="magnitude"), QuantizeConfig("nf4", double_quant=False)],
    }.items():
        ids[name] = compress(loaded.model, stages, progress=False).manifest.base_id
    other = compress(tiny_model("llama", seed=3).model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")],
                     progress=False)
    ids["other-source"] = other.manifest.base_id
    assert len(set(ids.values())) == len(ids)
    again = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    assert again.manifest.base_id == ids["a"]  # deterministic


def test_tampered_directory_is_refused(tmp_path):
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    base.save(tmp_path / "b")
    maps = IndexMaps.load(tmp_path / "b" / "index_maps.safetensors")
    maps.layers[0].ffn = maps.layers[0].ffn.flip(0)
    maps.save(tmp_path / "b" / "index_maps.safetensors")
    with pytest.raises(ValueError, match="do not match base_id"):
        CompressedBase.load(tmp_path / "b")


def test_a_manifest_whose_geometry_is_not_an_object_is_named_not_a_type_error(tmp_path):
    base = compress(tiny_model("llama").model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    base.save(tmp_path / "b")
    manifest = tmp_path / "b" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "geometry_before": None}))
    with pytest.raises(ValueError, match=r"manifest.json is damaged \(geometry_before is NoneType, not an object\)"):
        CompressedBase.load(tmp_path / "b")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(base.index_maps, "save", broken)
    with pytest.raises(OSError):
        base.save(tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_identity_maps_and_row_expansion():
    maps = IndexMaps.identity(geometry(tiny_model("llama").model))
    assert maps.q_rows(0).tolist() == list(range(64)) and maps.kv_rows(1).tolist() == list(range(32))
    local = IndexMaps.identity(geometry(tiny_model("llama").model))
    local.layers[0].q_heads = torch.tensor([1, 3])
    assert maps.compose(local).q_rows(0).tolist() == list(range(16, 32)) + list(range(48, 64))


def test_provenance_is_recorded_outside_base_id():
    """Calibration settings and library versions are recorded, but a library upgrade (or a manifest written
    before they were recorded) keeps the base_id of an unchanged config."""
    import hashlib
    from dataclasses import asdict

    from cpet import __version__

    base = compress(tiny_model("llama").model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    manifest = base.manifest
    assert manifest.libraries["torch"] == torch.__version__ and manifest.libraries["cpet"] == __version__
    assert {"transformers", "peft", "bitsandbytes", "torch-pruning"} <= set(manifest.libraries)
    manifest.calibration = {"corpus": "brown", "samples": 16, "seq_len": 128}
    # the base_id as computed before provenance was recorded: every field but base_id, minus stage timings
    payload = asdict(manifest)
    for key in ("base_id", "calibration", "libraries", "trained_digest"):  # trained_digest came later too
        payload.pop(key)
    for stage in payload["stages"]:
        stage.pop("seconds")
    old_id = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert manifest.base_id == manifest.compute_base_id() == old_id
    data = json.loads(manifest.to_json())
    assert data["calibration"] == {"corpus": "brown", "samples": 16, "seq_len": 128}
    upgraded = Manifest.from_json(json.dumps({**data, "libraries": {**data["libraries"], "torch": "9.9"}}))
    older = Manifest.from_json(json.dumps({k: v for k, v in data.items()
                                           if k not in ("calibration", "libraries", "trained_digest")}))
    assert upgraded.compute_base_id() == older.compute_base_id() == manifest.base_id
    assert older.calibration == {} and older.libraries == {}


def test_a_damaged_manifest_is_named_not_a_key_error(tmp_path):
    base = compress(tiny_model("llama").model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    data = json.loads(base.manifest.to_json())
    path = tmp_path / "manifest.json"
    assert Manifest.read(_written(path, json.dumps(data))).base_id == base.manifest.base_id
    for damaged, message in [({k: v for k, v in data.items() if k != "stages"}, r"KeyError: 'stages'"),
                             ({**data, "stages": [{**data["stages"][0], "extra": 1}]}, r"TypeError: .*extra"),
                             ([data], r"not a JSON object")]:
        with pytest.raises(ValueError, match=rf"manifest.json: .*{message}"):
            Manifest.read(_written(path, json.dumps(damaged)))


def _written(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("damaged", ["index_maps.safetensors", "model.safetensors"])
def test_a_damaged_safetensors_file_of_a_base_is_named_with_how_to_make_it_again(tmp_path, damaged, uniform):
    """A truncated index_maps.safetensors or model.safetensors was a bare SafetensorError ("incomplete metadata")
    that named no file: API callers could not tell which file of which base to replace."""
    stages = [PruneConfig(ffn_ratio=0.5, importance="magnitude")]
    if not uniform:  # per-layer widths: the weights are read by CompressedBase.load itself, not by transformers
        stages = [PruneConfig(ffn_ratio=0.5, importance="magnitude", layer_schedule={0: 0.25})]
    base = compress(tiny_model("llama").model, stages, progress=False)
    base.save(tmp_path / "b")
    assert base.manifest.uniform is uniform
    path = tmp_path / "b" / damaged
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{damaged} is not a readable safetensors file .*`cpet compress"):
        CompressedBase.load(tmp_path / "b")
