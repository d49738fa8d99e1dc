from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cpet.evaluate import (
    evaluating,
    classification_accuracy,
    count_parameters,
    flops_per_token,
    label_logprobs,
    logits_at,
    memory_bytes,
    perplexity,
    strided_windows,
    throughput,
)
from cpet.data.prompts import PromptTemplate
from cpet.models import byte_tokenizer, tiny_model


@pytest.mark.parametrize("n, length, stride", [(10, 4, 2), (10, 4, 4), (257, 64, 16), (5, 8, 8), (2, 4, 1)])
def test_strided_windows_score_each_token_once(n, length, stride):
    windows = strided_windows(n, length, stride)
    scored = [t for begin, end, first in windows for t in range(first, end)]
    assert len(scored) == len(set(scored))
    assert all(end - begin <= length and first > begin for begin, end, first in windows)
    assert windows[-1][1] == n
    if stride < length:
        assert scored == list(range(1, n))  # every token but the first, in order


def test_perplexity_of_uniform_model_is_vocab_size():
    loaded = tiny_model("llama")
    nn.init.zeros_(loaded.model.lm_head.weight)  # all logits zero -> uniform over the vocabulary
    result = perplexity(loaded.model, loaded.tokenizer, "some words to score " * 20, max_length=32, stride=16)
    assert result.ppl == pytest.approx(loaded.model.config.vocab_size, rel=1e-5)
    assert result.tokens == len("some words to score " * 20) - 1  # byte tokenizer: one token per byte


def test_perplexity_matches_transformers_loss_in_one_window():
    loaded = tiny_model("gemma")
    text = "The quick brown fox jumps over the lazy dog."
    ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = math.exp(loaded.model(ids, labels=ids).loss.item())
    result = perplexity(loaded.model, loaded.tokenizer, text, max_length=128, stride=128)
    assert result.ppl == pytest.approx(reference, rel=1e-5)


def test_perplexity_independent_of_batch_size():
    loaded = tiny_model("opt")
    text = "batching must not change what is scored. " * 10
    one = perplexity(loaded.model, loaded.tokenizer, text, max_length=48, stride=24, batch_size=1)
    many = perplexity(loaded.model, loaded.tokenizer, text, max_length=48, stride=24, batch_size=5)
    assert one.tokens == many.tokens
    assert one.ppl == pytest.approx(many.ppl, rel=1e-5)


def test_perplexity_rejects_empty_corpus():
    loaded = tiny_model("llama")
    with pytest.raises(ValueError, match="empty corpus"):
        perplexity(loaded.model, loaded.tokenizer, "   \n")


def test_perplexity_rejects_windows_that_score_nothing():
    loaded = tiny_model("llama")
    with pytest.raises(ValueError, match="max_length >= 2 and stride >= 1, got 1 and 256"):
        perplexity(loaded.model, loaded.tokenizer, "some words to score here", max_length=1)


@pytest.mark.parametrize("family", ["llama", "opt"])  # rotary positions (run on, unseen), learned (IndexError)
def test_sequences_past_the_context_are_refused_before_scoring(family):
    """A tiny model has 256 positions: a 257-token window, or a 256-token prompt and its 1-token label word, used
    to run on (rotary) or fail deep in the forward with an IndexError (learned positions)."""
    loaded = tiny_model(family)
    assert perplexity(loaded.model, loaded.tokenizer, "word " * 300, max_length=256).tokens > 256
    with pytest.raises(ValueError, match=r"the perplexity window \(max_length\) is 257 tokens, more than the 256 "
                                         r"positions this model was trained for .*--max-length\) to at most 256"):
        perplexity(loaded.model, loaded.tokenizer, "word " * 300, max_length=257)
    # the byte tokenizer reads " P" as two tokens
    with pytest.raises(ValueError, match=r"max_prompt_tokens=256 followed by its longest label word \(2 tokens\) is "
                                         r"258 tokens.*at most 254"):
        label_logprobs(loaded.model, loaded.tokenizer, ["a"], [" P", " N"], max_prompt_tokens=256)
    assert label_logprobs(loaded.model, loaded.tokenizer, ["a"], [" P", " N"], max_prompt_tokens=254).shape == (1, 2)


class EchoLM(nn.Module):
    """Predicts that the next token repeats the current one (logit 10 vs 0): a model with known answers."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.eye(vocab) * 10.0)
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


@dataclass
class Template:
    def format(self, text: str) -> str:
        return text


@pytest.mark.parametrize("words", [{"A": "a", "B": "b"}, {"A": "aa", "B": "bb"}])
def test_accuracy_with_known_answers(words):
    tokenizer = byte_tokenizer()
    model = EchoLM(len(tokenizer))
    texts = ["xa", "yyb", "a", "zzzb", "qa", "wb"]
    truth = ["A", "B", "A", "B", "A", "B"]
    verbalizer = SimpleNamespace(label_words=words)
    result = classification_accuracy(model, tokenizer, texts, truth, template=Template(),
                                     verbalizer=verbalizer, labels=["A", "B"], batch_size=4)
    assert result.accuracy == 1.0 and result.n == 6
    flipped = ["B", "B", "A", "A", "A", "B"]  # 4 of 6 right
    result = classification_accuracy(model, tokenizer, texts, flipped, template=Template(),
                                     verbalizer=verbalizer, labels=["A", "B"], batch_size=3)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.per_label_recall == {"A": pytest.approx(2 / 3), "B": pytest.approx(2 / 3)}


class FirstTokenLM(nn.Module):
    """Predicts, at every position, the sequence's first token (logit 10 vs 0): it answers from the text's start."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.eye(vocab) * 10.0)
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):  # right-padded: column 0 is a real token
        return SimpleNamespace(logits=self.table[input_ids[:, :1]].expand(-1, input_ids.shape[1], -1))


def test_long_prompts_lose_the_end_of_their_text_not_its_beginning():
    tokenizer = byte_tokenizer()
    texts = ["a " + "x " * 40, "b " + "y " * 40, "a z"]  # the answer is the first letter, 80 bytes before the end
    result = classification_accuracy(FirstTokenLM(len(tokenizer)), tokenizer, texts, ["A", "B", "A"],
                                     template=PromptTemplate("{text}?"),
                                     verbalizer=SimpleNamespace(label_words={"A": "a", "B": "b"}), labels=["A", "B"],
                                     max_prompt_tokens=16)
    assert result.accuracy == 1.0  # cut from the left, the long prompts would start with x / y


def test_label_logprobs_are_normalised_log_probabilities():
    tokenizer = byte_tokenizer()
    model = EchoLM(len(tokenizer))
    scores = label_logprobs(model, tokenizer, ["za"], ["a", "b"])
    expected_a = 10 - math.log(math.exp(10) + len(tokenizer) - 1)
    assert scores[0, 0].item() == pytest.approx(expected_a, abs=1e-5)  # float32 softmax
    assert scores[0, 1].item() == pytest.approx(expected_a - 10, abs=1e-5)


@pytest.mark.parametrize("words", [["a", "b"], ["ab", "ba"]])  # one token each / two tokens each
def test_label_scores_run_the_lm_head_at_the_scored_positions_only(tiny, words):
    """Batched scoring with the head at the union of the rows' scored positions equals each prompt scored
    alone with logits at every position; the head never sees a position nothing reads."""
    torch.manual_seed(0)
    model, tokenizer = tiny.model, tiny.tokenizer
    prompts = ["x", "hello there", "a longer prompt of text", "mid size"]
    head_positions = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_positions.append(args[0].shape[1]))
    scores = label_logprobs(model, tokenizer, prompts, words, batch_size=4)
    hook.remove()
    for row, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for col, word in enumerate(words):
            label_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + label_ids])).logits[0].float(), -1)
            expected = sum(logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(label_ids))
            assert scores[row, col].item() == pytest.approx(expected.item(), abs=1e-4)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if len(words[0]) == 1:  # one sequence per prompt, scored at its last position: 4 positions of 23
        assert head_positions == [len(set(lengths))] and max(lengths) > 2 * len(prompts)
    else:  # a sequence per (prompt, label), each read at the 2 positions before its end; 8 sequences, 2 batches
        assert all(k <= 2 * 4 < max(lengths) for k in head_positions) and len(head_positions) == 2


def test_label_scores_batch_prompts_of_similar_length_together():
    loaded = tiny_model("llama")
    prompts = ["a", "a long prompt of many many tokens", "b", "another long prompt of tokens"]
    seen = []
    hook = loaded.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                                  with_kwargs=True)
    scores = label_logprobs(loaded.model, loaded.tokenizer, prompts, ["x", "y"], batch_size=2)
    hook.remove()
    assert seen == [(2, 1), (2, 33)]  # the two one-token prompts together: 68 positions, not 2 x 2 x 34 = 136
    alone = torch.cat([label_logprobs(loaded.model, loaded.tokenizer, [p], ["x", "y"]) for p in prompts])
    assert torch.allclose(scores, alone, atol=1e-5)  # in the input's order


def test_logits_at_picks_the_positions_from_every_logit_when_the_model_cannot_keep_some():
    loaded = tiny_model("llama")

    class NoLogitsToKeep(nn.Module):
        config = loaded.model.config

        def forward(self, input_ids, attention_mask=None):
            return loaded.model(input_ids=input_ids, attention_mask=attention_mask)

    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        full = loaded.model(input_ids=ids).logits
        fallback = logits_at(NoLogitsToKeep(), [7, 2, 7], input_ids=ids)
        kept = logits_at(loaded.model, [7, 2, 7], input_ids=ids)
    for at in (fallback, kept):
        assert at.where == {2: 0, 7: 1} and at.logits.shape == (2, 2, full.shape[-1])
        assert torch.allclose(at.logits, full[:, [2, 7]], atol=1e-5)


def test_accuracy_rejects_unknown_gold_labels():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="not among the task labels"):
        classification_accuracy(EchoLM(len(tokenizer)), tokenizer, ["a"], ["C"], template=Template(),
                                verbalizer=SimpleNamespace(label_words={"A": "a"}), labels=["A"])



@pytest.mark.parametrize("gold", [["A", "B"], ["A", "B", "A", "B"]])
def test_accuracy_refuses_gold_labels_that_do_not_match_the_texts_one_to_one(gold):
    """Three texts with two gold labels were scored as 2 examples (the third text's prediction dropped), and with four
    a recall over a label without a prediction failed with an IndexError after every prompt was scored."""
    tokenizer = byte_tokenizer()
    model = EchoLM(len(tokenizer))
    with pytest.raises(ValueError, match=f"3 texts but {len(gold)} gold labels"):
        classification_accuracy(model, tokenizer, ["xa", "yb", "za"], gold, template=Template(),
                                verbalizer=SimpleNamespace(label_words={"A": "a", "B": "b"}), labels=["A", "B"])


def test_sizes_and_flops_of_tiny_llama():
    model = tiny_model("llama").model
    per_layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (128 * 64)
    linear = 2 * per_layer + 64 * 259
    embeddings_and_norms = 259 * 64 + 2 * (2 * 64) + 64
    assert count_parameters(model) == linear + embeddings_and_norms
    assert memory_bytes(model) == 4 * count_parameters(model)
    assert flops_per_token(model, context=128) == 2 * linear + 2 * 2 * 2 * 128 * 4 * 16


def test_a_tied_quantized_head_still_counts_its_flops():
    from cpet.compress.quantized_embeddings import TiedQuantizedHead, quantize_embeddings
    from cpet.config import QuantizeConfig

    model = tiny_model("gemma").model  # tied
    before = flops_per_token(model)
    quantize_embeddings(model, QuantizeConfig(method="nf4", embeddings=True))
    assert isinstance(model.get_output_embeddings(), TiedQuantizedHead)
    assert flops_per_token(model) == before  # the head multiplies as many weights, quantized or not


def test_tied_embeddings_count_once():
    model = tiny_model("gemma").model
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    assert count_parameters(model) < sum(p.numel() for p in model.state_dict().values())
    # the state dict lists the tied table twice (embedding and lm_head): memory must count it once
    assert memory_bytes(model) == 4 * count_parameters(model)


def test_throughput_is_tokens_over_the_best_of_its_repeats(monkeypatch):
    import cpet.evaluate

    loaded = tiny_model("qwen2")
    # the clock as the two repeats read it: prefill 2 s then 1 s, decode 4 s then 2 s
    ticks = iter([0.0, 2.0, 2.0, 6.0, 10.0, 11.0, 11.0, 13.0])
    monkeypatch.setattr(cpet.evaluate.time, "perf_counter", lambda: next(ticks))
    result = throughput(loaded.model, batch_size=2, prompt_len=16, new_tokens=4, repeats=2)
    monkeypatch.undo()
    assert result.prefill_tokens_per_s == 2 * 16 / 1.0 and result.decode_tokens_per_s == 2 * 4 / 2.0
    assert (result.batch_size, result.prompt_len, result.new_tokens) == (2, 16, 4)


def test_throughput_with_last_logits_only_runs_the_lm_head_on_one_prefill_position():
    loaded = tiny_model("llama")
    head_rows = []
    hook = loaded.model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[1]))
    throughput(loaded.model, batch_size=2, prompt_len=16, new_tokens=2, last_logits_only=True)
    hook.remove()
    # warm-up (8 positions, all logits), then the timed prefill (1 position) and 2 decode steps (1 each)
    assert head_rows == [8, 1, 1, 1]

    class NoLogitsToKeep(nn.Module):
        config = loaded.model.config

        def forward(self, input_ids, use_cache=False):
            return loaded.model(input_ids=input_ids, use_cache=use_cache)

    with pytest.raises(ValueError, match="logits_to_keep"):
        throughput(NoLogitsToKeep(), batch_size=1, prompt_len=4, new_tokens=1, last_logits_only=True)


def test_flops_of_a_moefied_model_count_the_share_of_experts_it_ran():
    from cpet.compress import compress
    from cpet.compress.moefy import MoEfyConfig, moe_blocks

    model = tiny_model("llama").model
    calibration = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=calibration, progress=False)
    config = model.config
    ffn = 2 * 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    router = sum(2 * (b.router.proj.in_features * b.router.proj.out_features
                      + b.router.out.in_features * b.router.out.out_features) for b in moe_blocks(base.model))
    dense = flops_per_token(model)
    assert flops_per_token(base.model) == pytest.approx(dense + router)
    for block in moe_blocks(base.model):
        block.top_k = 1
    assert flops_per_token(base.model) == pytest.approx(dense + router - 0.75 * ffn)  # top-1 of 4, before running
    for block in moe_blocks(base.model):
        block.tau, block.top_k = 0.9, None
    with torch.no_grad():
        base.model(input_ids=calibration[:1])
    share = sum(b.chosen_experts for b in moe_blocks(base.model)) / sum(4 * b.routed_tokens
                                                                        for b in moe_blocks(base.model))
    assert 0.25 <= share <= 1.0
    assert flops_per_token(base.model) == pytest.approx(dense + router - (1 - share) * ffn)


def test_perplexity_over_several_windows_weighs_every_token_the_same():
    """Disjoint windows of unequal length (48, 48, 48, 6 tokens): perplexity is exp(total nll / scored tokens), each
    window's transformers loss weighted by its scored tokens, not the mean of per-window perplexities/losses."""
    from cpet.evaluate import perplexity
    from cpet.models import tiny_model

    torch.manual_seed(0)
    loaded = tiny_model("gemma")
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "Zq!~"  # 139 byte tokens
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, count, losses = 0.0, 0, []
    for begin in range(0, len(ids), 48):
        window = torch.tensor([ids[begin:begin + 48]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = loaded.model(window, labels=window).loss.item()
        losses.append(loss)
        nll += loss * (window.shape[1] - 1)
        count += window.shape[1] - 1
    assert len(losses) >= 3 and max(losses) - min(losses) > 0.01  # windows differ: the weighting matters
    result = perplexity(loaded.model, loaded.tokenizer, text, max_length=48, stride=48, batch_size=2)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_evaluating_restores_each_modules_own_training_flag():
    """A model in train mode over a submodule kept in eval mode (a frozen base's dropout off) gets both back as they
    were: restoring with model.train(flag) switched the submodule to train mode too."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    with evaluating(model):
        assert not any(module.training for module in model.modules())
    assert model.training and model[0].training and not model[1].training
