"""Generic index maps: per-role rows/cols, composition, layouts on disk, and base_ids kept across the change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cpet.compress import CompressedBase, compress
from cpet.compress.index_maps import FFN_CHANNELS, IndexMaps, head_rows, rows_to_heads
from cpet.config import PruneConfig, QuantizeConfig
from cpet.models import Geometry, geometry, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])
LEGACY = Path(__file__).parent / "legacy_v1"
GEO = Geometry(num_layers=2, hidden_size=8, intermediate_size=6, num_heads=4, num_kv_heads=2, head_dim=2)

# base_ids of fixed configurations, computed with the code *before* index maps were generic and stages were
# registered (commit 279d3f7 and the working tree on top of it gave the same values), by
# ``compress(tiny_model(family).model, stages, progress=False).base_id``. They also depend on cpet.__version__
# (0.1.0, part of the manifest) and on the tiny models' seeded weights (the source fingerprint).
PINNED = {
    "llama-prune-heads-nf4": ("llama", lambda: [PruneConfig(ffn_ratio=0.25, head_ratio=0.5, importance="magnitude"),
                                                QuantizeConfig("nf4")],
                              "14680eda8e5b92677d2fa121eb1506eee1088f02e1311031c10f06e7587f988f"),
    "opt-prune": ("opt", lambda: [PruneConfig(ffn_ratio=0.5, importance="magnitude")],
                  "1ff5efdeb017548cbf12369727db076de7da576fb30a1f20b2425fca42f0675d"),
    "gemma-kvgroup": ("gemma", lambda: [PruneConfig(ffn_ratio=0.25, head_ratio=0.5, importance="magnitude",
                                                    head_mode="kv_group")],
                      "e49a52e89ae19ae1b033b1cb15152ef7d7a63e552ff4725823af9cec13594cef"),
    "llama-schedule": ("llama", lambda: [PruneConfig(layer_schedule={0: 0.5, 1: 0.25}, importance="magnitude")],
                       "d4b269439eafcff5cd8fb690e00ab4dd21fcb6c6ba823b4e42e5453edad8af54"),
    "llama-nf4": ("llama", lambda: [QuantizeConfig("nf4")],
                  "0a9f8843cd207f7b5a5150381bb92b93acdf34f77c9f82b5eaf28fb8a9b2c599"),
    "llama-empty": ("llama", lambda: [], "da9b02b9d7dc415dd73eae50f60c736ed7fabe883c72f14c43897f59d9b42f4f"),
}


@pytest.mark.parametrize("case", PINNED)
def test_base_id_of_an_unchanged_configuration_is_the_one_before_generic_maps(case):
    family, stages, expected = PINNED[case]
    assert compress(tiny_model(family).model, stages(), progress=False).base_id == expected


@pytest.mark.parametrize("case", ["llama-schedule", "llama-prune-heads-nf4"])
def test_a_base_saved_in_the_old_layout_loads(tmp_path, case):
    """``legacy_v1/CASE`` holds index_maps.safetensors (layout 1) and manifest.json as the code before the change
    wrote them for PINNED[CASE]; the weights (not part of the maps' layout) are written here by today's code."""
    family, stages, expected = PINNED[case]
    base = compress(tiny_model(family).model, stages(), progress=False)
    base.save(tmp_path / "b")
    for name in ("index_maps.safetensors", "manifest.json"):
        shutil.copy(LEGACY / case / name, tmp_path / "b" / name)
    again = CompressedBase.load(tmp_path / "b")
    assert again.base_id == expected == base.base_id
    assert again.index_maps == base.index_maps
    for layer in range(2):
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            for axis in ("rows", "cols"):
                assert torch.equal(again.index_maps.full(layer, role, axis), base.index_maps.full(layer, role, axis))
    with torch.no_grad():
        assert torch.equal(again.model(IDS).logits, base.model(IDS).logits)


def test_per_role_maps_compose_subsets_and_permutations():
    maps = IndexMaps.identity(GEO)
    assert maps.rows(0, "up") is None and maps.full(0, "up", "rows").tolist() == list(range(6))
    pruned = IndexMaps.identity(GEO)
    pruned.select(0, FFN_CHANNELS, [0, 2, 3, 5])
    pruned.set(1, "q", rows=head_rows(torch.tensor([1, 3]), 2))
    permuted = IndexMaps.identity(GEO)
    permuted.select(0, FFN_CHANNELS, [3, 1, 0, 2])  # indexes into the pruned model's 4 channels
    composed = maps.compose(pruned).compose(permuted)
    for role, axis in FFN_CHANNELS:  # original channels, in the order the compressed weight holds them
        assert composed.full(0, role, axis).tolist() == [5, 2, 0, 3]
    assert composed.rows(1, "q").tolist() == [2, 3, 6, 7] and composed.cols(1, "o") is None
    assert composed.rows(1, "up") is None and composed.cols(0, "q") is None
    assert not composed.uniform() and maps.uniform()
    assert rows_to_heads(torch.tensor([2, 3, 6, 7]), 2).tolist() == [1, 3]
    assert rows_to_heads(torch.tensor([3, 2]), 2) is None


def test_maps_outside_the_old_layout_round_trip_and_hash_their_own_layout(tmp_path):
    maps = IndexMaps.identity(GEO)
    maps.set(0, "q", cols=torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]))  # a hidden permutation: no layout-1 form
    maps.select(1, FFN_CHANNELS, torch.tensor([1, 0]))
    assert maps.legacy_tensors() is None
    maps.save(tmp_path / "m.safetensors")
    again = IndexMaps.load(tmp_path / "m.safetensors")
    assert again == maps and again.shapes == maps.shapes and again.head_dim == 2 and len(again) == 2
    assert again.cols(0, "q").tolist() == list(range(7, -1, -1)) and again.cols(1, "down").tolist() == [1, 0]
    legacy_fit = IndexMaps.identity(GEO)
    legacy_fit.select(1, FFN_CHANNELS, torch.tensor([1, 0]))
    assert legacy_fit.legacy_tensors() is not None and legacy_fit.digest() != maps.digest()


def test_an_old_layout_file_reads_back_and_keeps_its_digest(tmp_path):
    maps = IndexMaps.load(LEGACY / "llama-schedule" / "index_maps.safetensors")
    assert [len(maps.rows(i, "gate")) for i in range(2)] == [64, 96] and maps.widths()[1]["q_heads"] == 4
    maps.save(tmp_path / "m.safetensors")  # now in layout 2
    assert IndexMaps.load(tmp_path / "m.safetensors").digest() == maps.digest() == \
        "c3a8e969db8057d6cc0f546ee80bd1415cb4d2471c716309b0eac6e3ea3bf860"  # index_digest in its manifest.json


def test_an_unknown_layout_is_refused_saying_to_compress_again(tmp_path):
    save_file({"experts.0": torch.arange(3)}, str(tmp_path / "m.safetensors"), metadata={"layout": "9"})
    with pytest.raises(ValueError, match=r"layout this CPET does not read .* compress the base again"):
        IndexMaps.load(tmp_path / "m.safetensors")


def test_maps_of_a_non_gated_family_name_only_its_roles():
    base = compress(tiny_model("opt").model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    maps = base.index_maps
    assert "gate" not in maps.roles and maps.rows(0, "gate") is None
    assert torch.equal(maps.rows(0, "up"), maps.cols(0, "down")) and len(maps.rows(0, "up")) == 64
    assert geometry(base.model).intermediate_size == 64


def test_maps_whose_coupled_slots_disagree_have_no_old_layout_form_and_hash_their_own_layout():
    """A unit whose slots disagree has no old-layout form: reading only its first slot would give two different
    bases the same digest, hence the same base_id."""
    agreed = IndexMaps.identity(GEO)
    agreed.select(0, FFN_CHANNELS, [0, 1, 2, 3])
    ffn_split = IndexMaps.identity(GEO)
    ffn_split.select(0, FFN_CHANNELS, [0, 1, 2, 3])
    ffn_split.set(0, "down", cols=torch.tensor([1, 0, 2, 3]))  # down's columns no longer follow gate/up rows
    heads_split = IndexMaps.identity(GEO)
    heads_split.set(1, "q", rows=head_rows(torch.tensor([1, 3]), 2))
    heads_split.set(1, "o", cols=head_rows(torch.tensor([0, 2]), 2))
    heads_agreed = IndexMaps.identity(GEO)
    heads_agreed.set(1, "q", rows=head_rows(torch.tensor([1, 3]), 2))
    heads_agreed.set(1, "o", cols=head_rows(torch.tensor([1, 3]), 2))
    for split, fits in ((ffn_split, agreed), (heads_split, heads_agreed)):
        assert fits.legacy_tensors() is not None
        assert split.legacy_tensors() is None
        assert split.digest() != fits.digest() and split != fits
