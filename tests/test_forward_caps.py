"""The KV-cache argument is found by one rule and used everywhere: a model whose forward spells it ``cache``
(transformers >= 5.24) and one that spells it ``past_key_values`` (<= 5.23) get the same decode workload,
the same scoring strategy and scores, and the same greedy generation."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from helpers import tiny_llama
from rankwise.efficiency import timing
from rankwise.evaluation import engine
from rankwise.evaluation.generation import _generate_batch
from rankwise.models.forward import cache_kwargs, forward_caps, is_causal_lm, output_cache


class _Wrapper(nn.Module):
    """A thin causal LM around a tiny Llama; subclasses fix how ``forward`` spells the cache."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def _run(self, cache: Any, use_cache: bool | None, out_name: str, **kwargs: Any) -> Any:
        if use_cache:
            kwargs.update(cache_kwargs(self.inner, cache))
        else:
            kwargs["use_cache"] = False
        out = self.inner(**kwargs)
        return SimpleNamespace(logits=out.logits, **{out_name: output_cache(out) if use_cache else None})


class NewSpelling(_Wrapper):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        return self._run(cache, use_cache, "cache", input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, logits_to_keep=logits_to_keep)


class OldSpelling(_Wrapper):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0):
        return self._run(past_key_values, use_cache, "past_key_values", input_ids=input_ids,
                         attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep)


class NoCache(_Wrapper):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    inner = tiny_llama()
    return {"cache": NewSpelling(inner).eval(), "past_key_values": OldSpelling(inner).eval()}


def test_capabilities_found_under_either_name(models):
    for name, model in models.items():
        caps = forward_caps(model)
        assert caps.cache_arg == name and caps.kv_cache and caps.logits_to_keep
        assert is_causal_lm(model)
        assert set(cache_kwargs(model, "C")) == {name, "use_cache"}
    no_cache = NoCache(tiny_llama())
    assert not is_causal_lm(no_cache) and forward_caps(no_cache).cache_arg is None
    with pytest.raises(TypeError, match="takes no KV cache"):
        cache_kwargs(no_cache, None)


def test_decode_workload_feeds_the_cache_under_either_name(models):
    work = timing.Workload("decode", batch=2, seq_len=8, new_tokens=3)
    for model in models.values():
        runner = timing.prepare(model, work, torch.device("cpu"))
        state = runner.setup()
        assert state.get_seq_length() == 8
        runner.timed(state)
        assert state.get_seq_length() == 11  # every timed step went through the cache


def test_scoring_strategy_and_scores_equal_under_either_name(models):
    g = torch.Generator().manual_seed(1)
    ctx = [int(t) for t in torch.randint(0, 256, (40,), generator=g)]
    pairs = [(ctx, [int(t) for t in torch.randint(0, 256, (3,), generator=g)]) for _ in range(4)]
    pairs += [([*ctx[:35], 7], [9, 10]), (ctx[:33], [1])]
    scores = {}
    for name, model in models.items():
        assert engine.choose_strategy(model) == "packed"
        scores[name] = {s: engine.loglikelihood_tokens(model, pairs, batch_size=4, strategy=s)
                        for s in ("packed", "shared-context", "full")}
    for strategy, ref in scores["cache"].items():
        other = scores["past_key_values"][strategy]
        assert [r.is_greedy for r in ref] == [r.is_greedy for r in other]
        assert [r.logprob for r in ref] == pytest.approx([r.logprob for r in other], abs=1e-5)
        assert [r.logprob for r in ref] == pytest.approx([r.logprob for r in scores["cache"]["full"]], abs=1e-4)


def test_greedy_generation_equal_under_either_name(models):
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    outs = {name: _generate_batch(model, tok, prompts, (), 6, set(), 0) for name, model in models.items()}
    assert outs["cache"] == outs["past_key_values"]
    assert all(len(o) == 6 for o in outs["cache"])
    # the cached generation equals recomputing the whole sequence each step
    inner = models["cache"].inner
    seq = torch.tensor([prompts[0]])
    for _ in range(6):
        nxt = inner(seq, use_cache=False).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert outs["cache"][0] == seq[0, 5:].tolist()
