"""Quantized token embeddings and LM head: one tensor for a tied pair, exact lookups, save/reload, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cpet.compress import CompressedBase, compress
from cpet.compress.quantized_embeddings import QuantizedEmbedding4bit, QuantizedEmbedding8bit, TiedQuantizedHead
from cpet.config import QuantizeConfig
from cpet.evaluate import memory_bytes
from cpet.models import model_fingerprint, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 250]])


@pytest.mark.parametrize("method, table_type, tolerance", [("nf4", QuantizedEmbedding4bit, 0.25),
                                                            ("int8", QuantizedEmbedding8bit, 0.01)])
def test_a_tied_pair_becomes_one_quantized_tensor_and_reloads(method, table_type, tolerance, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True).model
    plain = compress(model, [QuantizeConfig(method)], progress=False)
    base = compress(model, [QuantizeConfig(method, embeddings=True)], progress=False)
    table, head = base.model.get_input_embeddings(), base.model.get_output_embeddings()
    assert isinstance(table, table_type) and isinstance(head, TiedQuantizedHead) and head.embedding is table
    assert not [k for k in base.model.state_dict() if k.startswith("lm_head")]  # stored once, under the embedding
    assert memory_bytes(base.model) < memory_bytes(plain.model)
    original = model.get_input_embeddings().weight
    dequantized = table.dequantized()
    assert torch.equal(table(IDS)[0], dequantized[IDS[0]])  # a lookup reads exactly the quantized rows
    assert (dequantized - original).abs().max() < tolerance * original.abs().max()
    with torch.no_grad():
        hidden = torch.randn(3, model.config.hidden_size)
        assert torch.allclose(head(hidden), hidden @ dequantized.T, atol=1e-3, rtol=1e-3)
    base.save(tmp_path / "base")
    again = CompressedBase.load(tmp_path / "base")
    assert again.model.get_output_embeddings().embedding is again.model.get_input_embeddings()
    twin = copy.deepcopy(again.model)  # CPET copies bases per adapter: the copy stays tied to its own table
    assert twin.get_output_embeddings().embedding is twin.get_input_embeddings()
    with torch.no_grad():
        logits = base.model(input_ids=IDS).logits
        assert torch.equal(logits, again.model(input_ids=IDS).logits)
        assert torch.equal(logits, twin(input_ids=IDS).logits)


def test_an_untied_head_is_quantized_as_a_linear_of_its_own():
    import bitsandbytes as bnb

    model = tiny_model("llama").model
    assert not model.config.tie_word_embeddings
    base = compress(model, [QuantizeConfig("nf4", embeddings=True)], progress=False)
    assert isinstance(base.model.get_output_embeddings(), bnb.nn.Linear4bit)
    assert isinstance(base.model.get_input_embeddings(), QuantizedEmbedding4bit)
    assert not base.manifest.uniform  # transformers' bitsandbytes path never quantizes embeddings
    # of its own weights: nf4 of the head, not of the embedding table
    from cpet.recovery import dequantized_weight

    head = dequantized_weight(base.model.get_output_embeddings()).float()
    original = model.get_output_embeddings().weight
    assert (head - original).abs().max() < 0.25 * original.abs().max()
    assert not torch.allclose(head, model.get_input_embeddings().weight, atol=0.1)


def test_embeddings_that_cannot_be_quantized_faithfully_are_refused_before_work(monkeypatch):
    import importlib

    quantize_module = importlib.import_module("cpet.compress.quantize")
    real = {name: getattr(quantize_module, name) for name in ("quantize", "quantize_in_place")}

    def no_work(*args, **kwargs):
        raise AssertionError("quantization started before the input was checked")

    for name in real:
        monkeypatch.setattr(quantize_module, name, no_work)

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = tiny_model("llama").model
    model.model.embed_tokens = ScaledEmbedding(model.config.vocab_size, model.config.hidden_size)
    with pytest.raises(ValueError, match="not a plain nn.Embedding"):
        compress(model, [QuantizeConfig("nf4", embeddings=True)], progress=False)
    narrow = tiny_model("llama", hidden_size=48, head_dim=12).model
    with pytest.raises(ValueError, match="not a multiple of 64"):
        compress(narrow, [QuantizeConfig("nf4", embeddings=True)], progress=False)
    for name, function in real.items():  # now the real work, for the case that is accepted
        monkeypatch.setattr(quantize_module, name, function)
    # int8 scales each row on its own: a width of 48 is fine there, and the quantized base stays close
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    base = compress(narrow, [QuantizeConfig("int8", embeddings=True)], progress=False)
    assert type(base.model.get_input_embeddings()).__name__ == "QuantizedEmbedding8bit"
    with torch.no_grad():
        reference = narrow(input_ids=ids).logits
        assert (base.model(input_ids=ids).logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_tied_head_with_a_bias_is_refused_not_dropped():
    """The quantized tied head computes x E^T: a tied phi head's bias (N(0, 2) here) was left out, logits off by ~6."""
    model = tiny_model("phi", tie_word_embeddings=True).model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_output_embeddings().bias is not None
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match="tied to the token embedding and has a bias"):
        compress(model, [QuantizeConfig("int8", embeddings=True)], progress=False)
    assert model_fingerprint(model) == before


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_base_with_only_its_embeddings_quantized_is_refused_as_already_quantized(method):
    """is_quantized looked for bitsandbytes layers only: a tied model whose embedding alone was quantized has none,
    so compressing it again was accepted. An int8 table then went through save_pretrained into a plain
    nn.Embedding (int8 codes read as float weights, -127..127: a garbage model, without a word); an nf4 one, and
    pruning either, failed deep in transformers or torch-pruning."""
    from cpet.config import PruneConfig

    model = tiny_model("llama", tie_word_embeddings=True).model
    quantized = compress(model, [QuantizeConfig(method, embeddings=True, modules=())], progress=False).model
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in quantized.modules())  # the case at hand
    for stage in (QuantizeConfig("nf4"), QuantizeConfig("nf4", embeddings=True),
                  PruneConfig(ffn_ratio=0.5, importance="magnitude")):
        with pytest.raises(ValueError, match="the input model is already quantized"):
            compress(quantized, [stage], progress=False)


def test_casting_an_int8_base_to_bf16_keeps_its_row_scales_fp32():
    model = tiny_model("llama", tie_word_embeddings=True).model
    base = compress(model, [QuantizeConfig("int8", embeddings=True)], progress=False)
    table = base.model.get_input_embeddings()
    scales, dequantized = table.SCB.clone(), table.dequantized()
    base.model.to(torch.bfloat16)
    assert table.SCB.dtype == torch.float32 and torch.equal(table.SCB, scales)  # not rounded through bf16
    assert torch.equal(table.dequantized(), dequantized)
    assert table(IDS).dtype == torch.bfloat16  # lookups follow the model's dtype
    assert "SCB" in dict(table.named_buffers())  # still saved with the table
    with torch.no_grad():
        assert base.model(input_ids=IDS).logits.dtype == torch.bfloat16
