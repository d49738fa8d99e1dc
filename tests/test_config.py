"""Validation of the compression stage configs (cpet.config) against values that are no setting."""

from __future__ import annotations

import pytest

from cpet.config import PruneConfig, QuantizeConfig, stage_config_from_dict


@pytest.mark.parametrize("kwargs, message", [
    # int(1.5) made it layer 1 and int(True) layer 1: another layer than the one written, without a word
    (dict(layer_schedule={1.5: 0.5}), r"layer_schedule layer must be a whole number, got 1\.5"),
    (dict(layer_schedule={True: 0.5}), r"layer_schedule layer must be a number, got True"),
    (dict(layer_schedule={"1.5": 0.5}), r"layer_schedule layer must be a whole number, got '1\.5'"),
    # "1" and 1 are one layer: the second ratio replaced the first
    (dict(layer_schedule={"1": 0.5, 1: 0.25}), r"layer_schedule names layer 1 twice"),
    # float(None) raised a TypeError, past the ValueError every caller reports
    (dict(layer_schedule={0: None}), r"layer_schedule\[0\] must be a number, got None"),
    # int(inf) raised an OverflowError, int(nan) a ValueError that named no field
    (dict(ffn_ratio=0.5, round_to=float("inf")), r"round_to must be a whole number, got inf"),
    (dict(ffn_ratio=0.5, round_to=float("nan")), r"round_to must be a whole number, got nan"),
])
def test_prune_settings_that_are_no_setting_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(ffn_ratio=kwargs.pop("ffn_ratio", 0.0), importance="magnitude", **kwargs)


def test_a_layer_schedule_read_back_from_json_keeps_its_layers():
    config = PruneConfig(layer_schedule={0: 0.5, 2: 0.25}, importance="magnitude")
    read = stage_config_from_dict({"stage": "prune", "layer_schedule": {"0": 0.5, "2": 0.25},
                                   "importance": "magnitude"})
    assert read == config and read.layer_schedule == {0: 0.5, 2: 0.25}
    assert PruneConfig(layer_schedule={2.0: 1 / 4}, importance="magnitude").layer_schedule == {2: 0.25}


@pytest.mark.parametrize("kwargs, message", [
    # tuple("lm_head") is its seven letters: every module whose name holds an "e" was then left unquantized
    (dict(skip_modules="lm_head"), r"skip_modules takes a list of module names, got the string 'lm_head'"),
    (dict(modules="model.layers.0.mlp.up_proj"), r"modules takes a list of module names, got the string"),
    (dict(skip_modules=("lm_head", "")), r"skip_modules takes module names \(non-empty text\), got ''"),
    (dict(modules=[3]), r"modules takes module names \(non-empty text\), got 3"),
])
def test_quantize_module_names_that_are_no_list_of_names_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeConfig("nf4", **kwargs)
    assert QuantizeConfig("nf4", skip_modules=["lm_head"]).skip_modules == ("lm_head",)
