"""peft LoRA on expert banks (cpet.moe.peft_lora): what peft features the MoEfied FFN can and cannot honour."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from cpet.adapters import add_lora
from cpet.compress import compress
from cpet.compress.moefy import MoEfyConfig
from cpet.models import tiny_model
from cpet.moe.peft_lora import register_bank_lora


def test_peft_mixed_adapter_batches_are_refused_on_a_moefied_base_not_run_with_one_adapter():
    """The MoEfied FFN calls the banks' expert paths, never the forward that peft's adapter_names hook feeds: row 1
    of adapters ["a", "b"] got "b" on attention and "a" on its FFN (logits 6.4 off "b" alone). Refused, and since
    peft leaves its hooks behind when a forward raises, every later call is refused too (never half mixed)."""
    model = tiny_model("llama").model.eval()
    tokens = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    base = compress(copy.deepcopy(model), [MoEfyConfig(num_experts=4, top_k=2, router_steps=5)],
                    calibration=tokens, progress=False)
    adapted = add_lora(base.model, rank=4, alpha=8, dropout=0.0, adapter_name="a")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=adapted.peft_config["a"].target_modules)
    register_bank_lora(config)
    adapted.add_adapter("b", config)
    adapted.eval()
    ids = torch.randint(3, 259, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = adapted(input_ids=ids).logits
        with pytest.raises(ValueError, match=r"mixed-adapter batches \(adapter_names=\.\.\.\) are not supported on a "
                                             r"MoEfied base.*cpet serve"):
            adapted(input_ids=ids, adapter_names=["a", "b"])
        assert alone.shape == (2, 8, model.config.vocab_size)
        with pytest.raises(ValueError, match="refuses every call from now on: load it again"):
            adapted(input_ids=ids)
