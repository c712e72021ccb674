"""The log-likelihood engine, subset selection, multiple-choice metrics, task parsing and ``rankwise eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_cli
from helpers import tiny_llama as _tiny
from rankwise.evaluation import engine
from rankwise.evaluation.sampling import select
from rankwise.evaluation.tasks.multiple_choice import MCDoc, ScoredDoc, acc_metrics, argmax, mc2_metric

# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_llama(smollm):
    """A 2-layer random Llama with the real tokenizer's vocabulary: fast, and a short max length."""
    return _tiny(vocab=smollm.model.config.vocab_size, hidden=32, intermediate=64, max_positions=24)


def _hflm(model, tokenizer, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, **kwargs)


def _lm_eval_loglikelihood(lm, requests):
    from lm_eval.api.instance import Instance

    return lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)],
                            disable_tqdm=True)


Q = "Question: Which gas do plants take in from the air?\nAnswer:"
REQUESTS = [
    (Q, " Carbon dioxide"), (Q, " Oxygen"), (Q, " Nitrogen gas, mostly from the soil"), (Q, " Helium"),
    ("The capital of France is", " Paris."),  # a context nobody shares
    ("Pick a letter.\nAnswer:", " A"), ("Pick a letter.\nAnswer:", " B"),  # one-token continuations
    ("Trailing space here ", "moves"),  # the context's trailing space joins the continuation
    ("", "An empty context scores against the prefix token"),
    ("A long passage that goes on for a while before the word we want to predict, which is", " elephant"),
]

# ----------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("context,continuation", [
    ("Answer: ", "Paris"), ("Answer:", " Paris"), ("hel", "lo"), ("x = 1 +", " 2"), ("Q\n\n", "A"),
    ("naïve café", " déjà vu"), ("", "Once upon a time"), ("Q:  ", "x"), ("end.", ""),
])
def test_encode_pair_matches_lm_eval(smollm, context, continuation):
    model, tokenizer, _ = smollm
    lm = _hflm(model, tokenizer)
    ours = engine.encode_pair(tokenizer, context, continuation)
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        theirs = ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
    else:
        theirs = lm._encode_pair(context, continuation)
    assert ours == (list(theirs[0]), list(theirs[1]))


def test_trailing_space_moves_to_continuation(smollm):
    tokenizer = smollm.tokenizer
    ctx, cont = engine.encode_pair(tokenizer, "Answer: ", "Paris")
    assert (ctx, cont) == engine.encode_pair(tokenizer, "Answer:", " Paris")
    assert ctx == tokenizer.encode("Answer:")
    assert ctx + cont == tokenizer.encode("Answer: Paris")


def test_continuation_is_what_follows_the_context_tokens(smollm):
    """When a token spans the boundary, the continuation is the whole encoding minus the context's length."""
    tokenizer = smollm.tokenizer
    ctx, cont = engine.encode_pair(tokenizer, "hel", "lo world")
    whole = tokenizer.encode("hello world")
    assert ctx == tokenizer.encode("hel")
    assert cont == whole[len(ctx):]


# ----------------------------------------------------------------------------------------------- scoring


def test_loglikelihoods_match_lm_eval(smollm):
    model, tokenizer, _ = smollm
    ours = engine.loglikelihood(model, tokenizer, REQUESTS, batch_size=4)
    theirs = _lm_eval_loglikelihood(_hflm(model, tokenizer), REQUESTS)
    for (ll, greedy), r in zip(theirs, ours, strict=True):
        assert r.logprob == pytest.approx(ll, abs=1e-3)
        assert r.is_greedy == greedy


PRIMER = ("Q: What is the boiling point of water at sea level?\nA: It is 100 degrees Celsius.\n\n"
          "Q: Which planet is known as the red planet?\nA: Mars is known as the red planet.\n\nQ: ")
HEAD_REQUESTS = [  # contexts sharing a long head (a few-shot primer): the head runs once per batch
    (PRIMER + "What is 2 + 2?\nA:", " 4."), (PRIMER + "What is 2 + 2?\nA:", " Five, probably."),
    (PRIMER + "Who wrote Hamlet?\nA:", " Shakespeare."), (PRIMER + "Who wrote Hamlet?\nA:", " Dickens."),
    (PRIMER + "Name a colour.", " Blue"),
]


def test_batch_size_and_strategy_do_not_change_results(smollm):
    model, tokenizer, _ = smollm
    requests = REQUESTS + HEAD_REQUESTS
    reference = engine.loglikelihood(model, tokenizer, requests, batch_size=1, strategy="full")
    # (1, "full") is the reference itself; every other combination must reproduce it.
    for batch_size, strategy in ((1, "packed"), (3, "packed"), (8, "packed"), (3, "shared-context"),
                                 (8, "shared-context"), (8, "full")):
        got = engine.loglikelihood(model, tokenizer, requests, batch_size=batch_size, strategy=strategy)
        for a, b in zip(reference, got, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4), (batch_size, strategy)
            assert (b.is_greedy, b.n_tokens) == (a.is_greedy, a.n_tokens)


def test_left_truncation_matches_lm_eval(smollm, tiny_llama):
    """Sequences longer than the model's maximum length lose tokens on the left, exactly as in HFLM."""
    tokenizer = smollm.tokenizer
    long_ctx = " ".join(["word"] * 40) + " and then"
    requests = [(long_ctx, " one more"), (long_ctx, " two more words"), ("short", " text")]
    assert engine.max_model_length(tiny_llama, tokenizer) == 24
    ours = engine.loglikelihood(tiny_llama, tokenizer, requests, batch_size=2)
    theirs = _lm_eval_loglikelihood(_hflm(tiny_llama, tokenizer), requests)
    for (ll, greedy), r in zip(theirs, ours, strict=True):
        assert r.logprob == pytest.approx(ll, abs=1e-4)
        assert r.is_greedy == greedy


class _PlainForward(torch.nn.Module):
    """A model that takes only input ids (no cache, no logits_to_keep): the engine must still work."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)


def test_models_without_cache_or_logits_to_keep(smollm, tiny_llama):
    tokenizer = smollm.tokenizer
    expected = engine.loglikelihood(tiny_llama, tokenizer, REQUESTS, batch_size=4)
    got = engine.loglikelihood(_PlainForward(tiny_llama), tokenizer, REQUESTS, batch_size=4)
    for a, b in zip(expected, got, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)


def test_replaced_linear_layers_are_scored_as_any_module(smollm, tiny_llama):
    """A decomposed model replaces Linear layers by other modules; here q_proj = (identity, then W) exactly."""
    import copy

    tokenizer = smollm.tokenizer
    model = copy.deepcopy(tiny_llama)
    proj = model.model.layers[0].self_attn.q_proj
    eye = torch.nn.Linear(proj.in_features, proj.in_features, bias=False)
    eye.weight.data = torch.eye(proj.in_features)
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(eye, proj)
    expected = engine.loglikelihood(tiny_llama, tokenizer, REQUESTS[:5])
    got = engine.loglikelihood(model, tokenizer, REQUESTS[:5])
    for a, b in zip(expected, got, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)


def test_empty_continuation_scores_zero(smollm, tiny_llama):
    (r,) = engine.loglikelihood(tiny_llama, smollm.tokenizer, [("end.", "")])
    assert (r.logprob, r.is_greedy, r.n_tokens) == (0.0, True, 0)


def test_batches_group_shared_heads_and_bound_padding():
    from rankwise.evaluation.engine import _MAX_PADDING, _PAD_SLACK, _batches, _Group, _Item, _shared_head

    def group(index, tokens):
        return _Group(tuple(tokens), [_Item(index, tuple(tokens), (1, 2))])

    head = list(range(100, 140))  # 40 tokens shared by three contexts (a few-shot block)
    family = [group(i, head + [500 + i] * k) for i, k in enumerate((3, 5, 7))]
    pool = [group(n, [1000 + n] * n) for n in (60, 58, 12, 11)]  # nothing shared
    batches = _batches(family + pool, batch_size=8)
    assert [sorted(g.items[0].index for g in b) for b in batches] == [[0, 1, 2], [58, 60], [11, 12]]
    assert _shared_head(batches[0]) == 40 and _shared_head(batches[1]) == 0
    for b in batches[1:]:
        lengths = [len(g.prefix) for g in b]
        assert len(b) * max(lengths) - sum(lengths) <= _MAX_PADDING * sum(lengths) + _PAD_SLACK * len(b)


# ----------------------------------------------------------------------------------------------- subsets


def test_limit_takes_the_first_items():
    assert select(10, limit=3).indices == [0, 1, 2]
    assert select(2, limit=5).indices == [0, 1]
    assert "first 3 of 10" in select(10, limit=3).description
    assert select(4).indices == [0, 1, 2, 3]


def test_sample_is_seeded_sorted_and_distinct():
    a = select(1000, sample=50, seed=7)
    assert a.indices == select(1000, sample=50, seed=7).indices
    assert a.indices != select(1000, sample=50, seed=8).indices
    assert a.indices == sorted(set(a.indices)) and len(a.indices) == 50
    assert "seed 7" in a.description
    assert select(5, sample=50).indices == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs,message", [
    ({"limit": 2, "sample": 2}, "mutually exclusive"), ({"limit": 0}, "--limit"), ({"sample": -1}, "--sample"),
])
def test_bad_subsets_are_one_line_errors(kwargs, message):
    from rankwise.errors import RankwiseError

    with pytest.raises(RankwiseError, match=message):
        select(10, **kwargs)


# ----------------------------------------------------------------------------------------------- metrics


def test_acc_norm_divides_by_characters_and_ties_go_first():
    doc = MCDoc(0, "ctx", ["a", "bbbbbbbbbb"], gold=1)
    scored = ScoredDoc(doc, [-2.0, -10.0], [False, False])  # per char: -2.0 vs -1.0
    assert acc_metrics(scored) == {"acc": 0.0, "acc_norm": 1.0}
    assert argmax([1.0, 3.0, 3.0]) == 1


def test_mc2_is_the_normalized_mass_of_true_answers():
    doc = MCDoc(0, "ctx", ["t1", "f1", "t2"], gold=0, labels=[1, 0, 1])
    lls = [math.log(0.2), math.log(0.5), math.log(0.3)]
    assert mc2_metric(ScoredDoc(doc, lls, [False] * 3))["acc"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- task files


def test_hellaswag_recovers_ctx_b_and_capitalizes_it():
    from rankwise.evaluation.tasks.hellaswag import process_doc, reconstruct

    lines = ["Roof shingle removal: A man is sitting on a roof. he", "3", "is using wrap.", "is ripping tiles.",
             "is holding a [title] cube.", "starts pulling up roofing."]
    rec = reconstruct(lines, "test")
    assert (rec["ctx_a"], rec["ctx_b"]) == ("A man is sitting on a roof.", "he")
    query, endings, gold = process_doc(rec)
    assert query == "Roof shingle removal: A man is sitting on a roof. He"
    assert endings[2] == "is holding a. cube." and gold == 3
    wikihow = reconstruct(["Home: How to x. Do y.", "0", "a", "b", "c", "d"], "test")
    assert wikihow["ctx_b"] == ""


def test_openbookqa_choices_are_parsed():
    from rankwise.evaluation.tasks.openbookqa import parse_choices

    labels, texts = parse_choices("(A) a marsh (B) a tundra (C) the plains (D) a desert", "t")
    assert labels == ["A", "B", "C", "D"] and texts == ["a marsh", "a tundra", "the plains", "a desert"]


def test_wsc_span_fix_and_prompt():
    from rankwise.evaluation.tasks.superglue import fix_wsc_spans, wsc_text

    ex = {"text": "The man lifted the boy . He was strong .", "span1_index": 0, "span1_text": "the man.",
          "span2_index": 6, "span2_text": "He", "label": 1}
    fixed = fix_wsc_spans(ex)
    assert fixed["span1_text"] == "The man"
    assert wsc_text(fixed).startswith("Passage: The man lifted the boy. *He* was strong.\n")


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_unknown_task(capsys):
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "arc_easy,no_such_task"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown task 'no_such_task'" in err


def test_cli_missing_data_dir(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "arc_easy", "--data-dir", str(missing)], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert str(missing) in err and "RANKWISE_DATA" in err


def test_cli_missing_data_file(capsys, tmp_path):
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "piqa", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert str(tmp_path / "piqa" / "valid.jsonl") in err and "README" in err


def test_cli_encoder_model_for_loglikelihood_task(capsys):
    code, _, err = run_cli(["eval", "minilm-l6", "--tasks", "arc_easy", "--limit", "2", "-q"], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "arc_easy" in err and "LM head" in err


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "fastest"], "unknown --strategy 'fastest'"),
    (["--strategy", "packed", "--harness", "lm-eval"], "--strategy applies to --harness rankwise"),
])
def test_cli_bad_strategy_is_a_one_line_error(capsys, argv, message):
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "copa", *argv], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and message in err


@pytest.mark.slow  # loads the real model
def test_cli_forced_strategy_is_used_and_reported(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "copa", "--limit", "3", "--strategy", "full",
                            "--json", str(out_json)], capsys)
    assert code in (0, None) and "copa: scoring strategy full (requested" in err
    proto = json.loads(out_json.read_text())["results"]["copa"]["protocol"]
    assert proto["strategy"] == "full" and proto["strategy_reason"] == "requested (auto would use packed)"


def test_cli_limit_and_sample_are_exclusive(capsys):
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "copa", "--limit", "2", "--sample", "2"], capsys)
    assert code == 2 and "mutually exclusive" in err


@pytest.mark.slow  # runs lm-eval
def test_cli_writes_results_and_samples(capsys, tmp_path):
    out_json, out_samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    code, stdout, _ = run_cli(["eval", "smollm2-135m", "--tasks", "copa,rte", "--limit", "3", "-q",
                            "--json", str(out_json), "--log-samples", str(out_samples)], capsys)
    assert code in (0, None)
    assert "copa" in stdout and "acc" in stdout
    doc = json.loads(out_json.read_text())
    copa = doc["results"]["copa"]
    assert copa["n"] == 3 and set(copa["metrics"]) == {"acc"} and "acc" in copa["stderr"]
    assert copa["protocol"]["shots"] == 0 and "first 3 of 100" in copa["protocol"]["subset"]
    assert copa["protocol"]["strategy"] == "packed" and "probe" in copa["protocol"]["strategy_reason"]
    assert doc["options"]["strategy"] == "auto"
    assert doc["model"]["name"] == "smollm2-135m"
    lines = [json.loads(x) for x in out_samples.read_text().splitlines()]
    assert [x["task"] for x in lines] == ["copa"] * 3 + ["rte"] * 3
    assert all(len(x["loglikelihoods"]) == 2 and "context" in x for x in lines)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_pooled_stderr_is_lm_evals():
    from lm_eval.api.metrics import pooled_sample_stderr

    from rankwise.evaluation.results import pooled_stderr

    assert pooled_stderr([0.05, 0.02, 0.1], [30, 200, 12]) == pytest.approx(
        float(pooled_sample_stderr([0.05, 0.02, 0.1], [30, 200, 12])), rel=1e-12)


def test_mmlu_group_aggregates_subjects_by_size(smollm):
    from rankwise.evaluation.registry import EvalOptions
    from rankwise.evaluation.results import pooled_stderr
    from rankwise.evaluation.runner import evaluate

    (group,) = evaluate(smollm.model, smollm.tokenizer, ["mmlu_social_sciences"],
                        EvalOptions(limit=2, progress=False))
    assert len(group.subtasks) == 12 and group.n == 24
    assert all(s.n == 2 and s.task.startswith("mmlu_") for s in group.subtasks)
    assert group.metrics["acc"] == pytest.approx(sum(s.metrics["acc"] for s in group.subtasks) / 12)
    assert group.stderr["acc"] == pytest.approx(pooled_stderr([s.stderr["acc"] for s in group.subtasks], [2] * 12))
    assert group.protocol["shots"] == 0 and "per subject" in group.protocol["subset"]


def test_mmlu_pooled_sample_is_uniform_over_all_questions(smollm):
    """A pooled sample draws N of the group's questions together (not N per subject): its accuracy is the
    plain mean and its stderr the sample's own, and it scores the same items as the per-subject path would."""
    import math

    from rankwise.evaluation.registry import EvalOptions
    from rankwise.evaluation.runner import evaluate

    options = EvalOptions(sample=12, seed=7, pooled=True, progress=False, log_samples=True)
    (pooled,) = evaluate(smollm.model, smollm.tokenizer, ["mmlu_social_sciences"], options)
    assert pooled.n == 12 and "pooled over 12 subjects" in pooled.protocol["subset"]
    correct = [s["acc"] for s in pooled.samples]
    p = sum(correct) / 12
    assert pooled.metrics["acc"] == pytest.approx(p)
    assert pooled.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) / 11))
    assert len({s["subject"] for s in pooled.samples}) > 1
    again = evaluate(smollm.model, smollm.tokenizer, ["mmlu_social_sciences"], options)[0]
    assert again.metrics == pooled.metrics  # seeded: the same questions every time


@pytest.mark.slow  # runs lm-eval
def test_cli_harness_lm_eval_runs_lm_evals_task_on_local_data(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code, stdout, _ = run_cli(["eval", "smollm2-135m", "--tasks", "copa", "--limit", "2", "-q",
                            "--harness", "lm-eval", "--json", str(out_json)], capsys)
    assert code in (0, None) and "harness lm-eval" in stdout
    copa = json.loads(out_json.read_text())["results"]["copa"]
    assert copa["n"] == 2 and "acc" in copa["metrics"] and copa["protocol"]["harness"].startswith("lm-eval")
    assert copa["protocol"]["source"].startswith("local data")


def test_cli_harness_without_lm_eval_is_a_one_line_error(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    code, _, err = run_cli(["eval", "smollm2-135m", "--tasks", "copa", "--harness", "lm-eval"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "pip install" in err
