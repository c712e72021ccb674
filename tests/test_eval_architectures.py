"""Every scoring strategy is exact on every architecture family it is allowed on, and the choice is said.

Tiny random models built from transformers' config classes (eleven families with the attention rules that
matter for packing: plain causal, one sliding window smaller than the items, alternating full/sliding
layers, soft-capping, attention sinks, absolute position embeddings, ALiBi) score the same requests packed, with a shared
context cache and one sequence per request; each must equal a direct one-sequence-per-request forward
within 1e-4, with contexts and choices longer than the window. A probe error that is not a mask or
position-id incompatibility surfaces; forced strategies that would be inexact are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.evaluation import engine

VOCAB = 96
WINDOW = 8
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

#: family -> config factory (tiny; windows of 8 tokens where the family has one)
FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE),
    "mistral-window": lambda: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=WINDOW),
    "qwen2-full+sliding": lambda: tf.Qwen2Config(**_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW,
                                                 max_window_layers=1),
    "gemma2-softcap": lambda: tf.Gemma2Config(**_LLAMA_LIKE, head_dim=8, sliding_window=WINDOW),
    "gemma3": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=8, sliding_window=WINDOW,
                                          layer_types=["sliding_attention", "full_attention"]),
    # a window wider than the shared 34-token head: the head runs from a (sliding) cache, per-type masks
    "gemma3-window48": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=8, sliding_window=48,
                                                   layer_types=["sliding_attention", "full_attention"]),
    "phi3-window": lambda: tf.Phi3Config(**_LLAMA_LIKE, sliding_window=WINDOW, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0),
    "gpt-neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                bos_token_id=0, eos_token_id=0, pad_token_id=1),
    # attention sinks (a learned logit per head in the softmax) on alternating sliding/full layers
    "gpt-oss-sinks": lambda: tf.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                             sliding_window=WINDOW, max_position_embeddings=128,
                                             layer_types=["sliding_attention", "full_attention"]),
    "falcon-alibi": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, alibi=True, bos_token_id=0, eos_token_id=0),
}
#: what auto picks, and a word its reason must contain
EXPECTED = {name: ("packed", "probe") for name in FAMILIES} | {"falcon-alibi": ("shared-context", "ALiBi")}
STRATEGY_NAMES = ("packed", "shared-context", "full")


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def _pairs() -> list[tuple[list[int], list[int]]]:
    """Multiple-choice-like requests: shared contexts (4 and 2 choices), contexts sharing a 34-token head
    (the few-shot path), lone requests, one-token choices; contexts and choices longer than the window."""
    g = torch.Generator().manual_seed(3)

    def toks(n: int) -> list[int]:
        return [int(t) for t in torch.randint(2, VOCAB, (n,), generator=g)]

    head = toks(34)
    pairs: list[tuple[list[int], list[int]]] = []
    for ctx_len, cont_lens in ((5, (3, 1, 12, 4)), (21, (2, 9)), (3, (1, 1))):
        ctx = toks(ctx_len)
        pairs += [(ctx, toks(n)) for n in cont_lens]
    for extra, cont_lens in ((4, (3, 5)), (9, (2, 11)), (2, (6,))):
        ctx = head + toks(extra)
        pairs += [(ctx, toks(n)) for n in cont_lens]
    pairs += [(toks(14), toks(10)), (toks(1), toks(2))]
    return pairs


def _reference(model: nn.Module, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """One sequence per request, no padding, no mask, no cache: the model's own attention rule."""
    out = []
    with torch.inference_mode():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont[:-1]])
            logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, -len(cont):].float(), -1)
            target = torch.tensor(cont)
            out.append((float(logprobs.gather(1, target[:, None]).sum()),
                        bool((logprobs.argmax(-1) == target).all())))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_allowed_strategy_equals_one_sequence_per_request(family):
    model = _model(family)
    pairs = _pairs()
    want = _reference(model, pairs)
    chosen = engine.resolve_strategy(model)
    assert (chosen.name, EXPECTED[family][1] in chosen.reason) == (chosen.name, True), chosen
    assert chosen.name == EXPECTED[family][0], chosen
    allowed = STRATEGY_NAMES if chosen.name == "packed" else STRATEGY_NAMES[1:]
    for strategy in allowed:
        got = engine.loglikelihood_tokens(model, pairs, batch_size=3, max_length=128, strategy=strategy)
        for i, (r, (ll, greedy)) in enumerate(zip(got, want, strict=True)):
            assert r.logprob == pytest.approx(ll, abs=1e-4), (family, strategy, i, pairs[i])
            assert r.is_greedy == greedy, (family, strategy, i)
    if chosen.name != "packed":
        with pytest.raises(RankwiseError, match="would not be exact"):
            engine.resolve_strategy(model, "packed")


@pytest.mark.parametrize("family", ["llama", "gemma2-softcap", "gpt2"])
def test_lm_head_runs_only_at_continuation_positions(family):
    """Every strategy asks the model for logits only where a continuation token is predicted (plus one row
    per head prefill): a 150k-vocabulary head never sees context positions."""
    model = _model(family)
    pairs = _pairs()
    engine.resolve_strategy(model)  # the probe's own forwards are not counted
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        for strategy in STRATEGY_NAMES:
            calls.clear()
            engine.loglikelihood_tokens(model, pairs, batch_size=3, max_length=128, strategy=strategy)
            scored = sum(len(cont) for _, cont in pairs)
            assert sum(calls) <= scored + len(calls), (strategy, calls)
            assert sum(calls) < sum(len(c) + len(x) for c, x in pairs) / 2
    finally:
        hook.remove()


def test_window_longer_than_every_item_keeps_packing_and_its_head():
    """A sliding window that never binds (the acceptance case: Llama weights in a Mistral config) gives the
    same scores as the windowless model, packed."""
    llama = _model("llama")
    config = tf.MistralConfig(**_LLAMA_LIKE, sliding_window=4096)
    mistral = tf.MistralForCausalLM(config).eval()
    mistral.load_state_dict(llama.state_dict())
    pairs = _pairs()
    assert engine.resolve_strategy(mistral).name == "packed"
    a = engine.loglikelihood_tokens(llama, pairs, batch_size=4, max_length=128)
    b = engine.loglikelihood_tokens(mistral, pairs, batch_size=4, max_length=128)
    assert [r.logprob for r in b] == pytest.approx([r.logprob for r in a], abs=1e-5)


# ------------------------------------------------------------------------------------ probe and forcing


class _Wrapped(nn.Module):
    """A causal LM around a tiny Llama whose forward misbehaves on a 4-D mask in a chosen way."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__()
        self.inner = _model("llama")
        self.config = self.inner.config
        self.error = error

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        if self.error is not None and attention_mask is not None and attention_mask.ndim == 4:
            raise self.error
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
        return SimpleNamespace(logits=out.logits, cache=out.cache)


def test_probe_error_that_is_not_a_mask_incompatibility_surfaces():
    model = _Wrapped(ZeroDivisionError("a real bug in a replaced layer"))
    with pytest.raises(ZeroDivisionError, match="real bug"):
        engine.resolve_strategy(model)
    model = _Wrapped(RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.loglikelihood_tokens(model, _pairs(), batch_size=2)


@pytest.mark.parametrize("error", [
    TypeError("forward() got an unexpected keyword argument 'position_ids'"),
    ValueError("Attention mask should be of size (1, 1, 38, 38), but is torch.Size([1, 1, 38, 45])"),
])
def test_mask_incompatibility_falls_back_with_the_reason_and_refuses_forced_packing(error):
    model = _Wrapped(error)
    chosen = engine.resolve_strategy(model)
    assert chosen.name == "shared-context" and str(error)[:30] in chosen.reason
    pairs = _pairs()
    got = engine.loglikelihood_tokens(model, pairs, batch_size=3, max_length=128)
    want = _reference(model.inner, pairs)
    assert [r.logprob for r in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    with pytest.raises(RankwiseError, match="strategy 'packed' would not be exact"):
        engine.loglikelihood_tokens(model, pairs, strategy="packed")


class _NoCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _model("llama")
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)


def test_model_without_kv_cache_gets_full_with_the_reason():
    model = _NoCache()
    chosen = engine.resolve_strategy(model)
    assert chosen.name == "full" and "no KV cache" in chosen.reason
    with pytest.raises(RankwiseError, match="shared-context"):
        engine.resolve_strategy(model, "shared-context")
    assert engine.resolve_strategy(model, "full") == chosen
    with pytest.raises(RankwiseError, match="unknown scoring strategy"):
        engine.resolve_strategy(model, "fastest")
