"""The non-multiple-choice tasks: WikiText-2 perplexity (token-level and lm-eval rolling), GSM8K, STS-B,
WinoGrande. Real models and real data, small slices; lm-eval 0.4.13's own functions as the reference."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rankwise.errors import DataError
from rankwise.evaluation.generation import cut_at_stop, greedy_generate
from rankwise.evaluation.perplexity import (
    Window,
    prefix_token_id,
    rolling_pairs,
    score_windows,
    target_logprobs,
    token_windows,
)
from rankwise.evaluation.registry import EvalOptions, get_task
from rankwise.evaluation.tasks import gsm8k, wikitext, winogrande

WIKI = "wikitext-2-raw/wiki.test.raw"


def _opts(**kw) -> EvalOptions:
    return EvalOptions(progress=False, **kw)


@pytest.fixture
def one_thread():
    """Token-by-token decoding is hundreds of tiny ops per step; on a shared CPU, OpenMP barriers across
    threads then dominate (measured: 4.3 s vs 0.32 s per step with 2 vs 1 thread under load), so the
    generation tests decode on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------- window arithmetic


def test_token_windows_are_disjoint_and_drop_the_partial_tail():
    ids = list(range(10))
    wins = token_windows(ids, 4)
    assert [w.inputs for w in wins] == [(0, 1, 2), (4, 5, 6)]
    assert [w.targets for w in wins] == [(1, 2, 3), (5, 6, 7)]  # tokens 8, 9 (partial window) dropped


@pytest.mark.parametrize("max_len", [1, 2, 5, 16])
def test_rolling_windows_match_lm_eval(max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(max_len)
    for n in [1, 2, max_len, max_len + 1, 3 * max_len + 2, 37]:
        ids = [rng.randrange(1000) for _ in range(n)]
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 7, max_len, 1)]
        ours = list(rolling_pairs(ids, 7, max_len))
        assert ours == theirs
        assert [t for _, cont in ours for t in cont] == ids  # every token predicted exactly once
        for ctx, cont in ours:
            assert len(ctx) + len(cont) - 1 <= max_len


def test_target_logprobs_equals_log_softmax_gather():
    logits = torch.randn(2500, 50, dtype=torch.float64)
    targets = torch.randint(0, 50, (2500,))
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(target_logprobs(logits, targets, chunk=1000).double(), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- wikitext data


def test_wikitext_documents_and_counts(data_dir):
    """62 documents, as EleutherAI/wikitext_document_level's test split; lm-eval's word/byte counting."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    raw = wikitext.read_raw(data_dir / WIKI)
    pages = wikitext.split_documents(raw)
    assert len(pages) == 62
    assert pages[0].startswith(" = Robert Boulter = \n")
    assert all(p.lstrip().startswith("= ") for p in pages)
    assert sum(wikitext.count_words(p) for p in pages) == 241_335
    assert sum(wikitext.count_bytes(p) for p in pages) == 1_290_527
    for page in pages:
        assert wikitext.detokenize(page) == wikitext_detokenizer({"page": page})
        counts = process_results({"page": page}, [0.0])
        assert counts["word_perplexity"][1] == wikitext.count_words(page)
        assert counts["byte_perplexity"][1] == wikitext.count_bytes(page)
    rows = wikitext.dataset_rows(raw)
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"


# ----------------------------------------------------------------------------------- wikitext perplexity


def test_token_perplexity_equals_a_plain_loop(smollm, data_dir):
    """First 2 windows of 256 tokens: the task's number is exp(mean NLL) of an independent naive loop."""
    model, tokenizer, _ = smollm
    result = get_task("wikitext_token").run(model, tokenizer, _opts(seq_len=256, limit=2, batch_size=2))
    rows = wikitext.dataset_rows(wikitext.read_raw(data_dir / WIKI))
    ids = tokenizer("\n\n".join(rows))["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(2):
            x = torch.tensor([ids[w * 256 : (w + 1) * 256]])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(1, x[0, 1:, None]).sum())
            count += 255
    expected = math.exp(nll / count)
    ppl = result.metrics["token_perplexity"]
    assert result.n == 2 and result.protocol["predicted_tokens"] == 510
    assert 10 < ppl < 100
    assert ppl == pytest.approx(expected, rel=1e-4)
    assert result.stderr["token_perplexity"] is not None and result.stderr["token_perplexity"] > 0
    # a study worker's derived cache: the split is tokenized once, the numbers do not change
    derived: dict = {}
    again = [get_task("wikitext_token").run(model, tokenizer, _opts(seq_len=256, limit=2, batch_size=2,
                                                                   derived=derived)) for _ in range(2)]
    assert [r.metrics for r in again] == [result.metrics] * 2
    assert [k[:2] for k in derived] == [("wikitext", "raw"), ("wikitext_token", "ids")]
    assert derived[next(k for k in derived if k[1] == "ids")][:1000] == ids[:1000]


def test_rolling_wikitext_matches_lm_eval(smollm, data_dir, tmp_path):
    """The lm-eval ``wikitext`` task on two real (short) documents: same log-likelihoods as HFLM's
    ``loglikelihood_rolling`` with a 128-token window (so one document needs several windows)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, _ = smollm
    pages = wikitext.split_documents(wikitext.read_raw(data_dir / WIKI))
    short = sorted(range(len(pages)), key=lambda i: len(pages[i]))[:2]
    picked = [pages[i] for i in sorted(short)]
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / WIKI).write_text("\n".join(picked), encoding="utf-8")
    assert wikitext.split_documents((tmp_path / WIKI).read_text(encoding="utf-8")) == picked

    result = get_task("wikitext").run(model, tokenizer, _opts(data_dir=tmp_path, seq_len=128, limit=2))
    ours = [s["loglikelihood"] for s in result.samples]
    assert result.samples[1]["tokens"] > 128  # the second document spans several windows

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(wikitext.detokenize(p),), idx=0)
                for p in picked]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-2, rel=1e-5)
    words = sum(wikitext.count_words(p) for p in picked)
    n_bytes = sum(len(p.encode()) for p in picked)
    # The derived metrics are functions of our own log-likelihoods (checked tightly, float64 arithmetic) ...
    assert result.metrics["word_perplexity"] == pytest.approx(math.exp(-sum(ours) / words), rel=1e-9)
    assert result.metrics["bits_per_byte"] == pytest.approx(-sum(ours) / n_bytes / math.log(2), rel=1e-9)
    # ... and agree with lm-eval's within the per-document tolerance propagated through them: a summed
    # log-likelihood off by d moves word perplexity by a factor exp(d / words) and bits/byte by d / bytes / ln 2.
    d = sum(max(1e-2, 1e-5 * abs(t)) for t in theirs)
    assert abs(math.log(result.metrics["word_perplexity"]) + sum(theirs) / words) <= d / words
    assert abs(result.metrics["bits_per_byte"] + sum(theirs) / n_bytes / math.log(2)) <= d / n_bytes / math.log(2)


def test_rolling_scores_equal_whole_sequence_when_it_fits(smollm):
    """A document shorter than the window is one forward pass after the prefix token."""
    model, tokenizer, _ = smollm
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    prefix = prefix_token_id(tokenizer)
    (lp,) = score_windows(model, [Window.from_pair([prefix], ids)])
    with torch.no_grad():
        x = torch.tensor([[prefix, *ids]])
        ref = torch.log_softmax(model(x).logits[0, :-1].float(), -1).gather(1, x[0, 1:, None]).squeeze(1)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-4)


def test_missing_wikitext_file_names_the_path(smollm, tmp_path):
    model, tokenizer, _ = smollm
    with pytest.raises(DataError, match=r"wikitext-2-raw/wiki\.test\.raw"):
        get_task("wikitext_token").run(model, tokenizer, _opts(data_dir=tmp_path))


def test_bad_lengths_are_one_line_errors():
    from rankwise.errors import RankwiseError

    with pytest.raises(RankwiseError, match="seq-len of at least 2"):
        get_task("wikitext_token").run(None, None, _opts(seq_len=1))
    with pytest.raises(RankwiseError, match="seq-len above 256"):
        get_task("gsm8k").run(None, None, _opts(seq_len=200))


# ----------------------------------------------------------------------------------- gsm8k


def test_gsm8k_answer_extraction():
    assert gsm8k.extract_strict("so 5 + 3 = 8.\n#### 8") == "8"
    assert gsm8k.extract_strict("#### -1,234.5 and then #### 7") == "-1,234.5"  # first match
    assert gsm8k.extract_strict("The answer is 8.") == "[invalid]"
    assert gsm8k.extract_flexible("He has 3 apples, then 12 more: $15.") == "$15."  # last number-like token
    assert gsm8k.extract_flexible("no digits here") == "[invalid]"
    assert gsm8k.extract_flexible("answer 7") == "7"
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k.exact_match("72", ref) == 1.0
    assert gsm8k.exact_match("$72.", ref) == 1.0  # '$' and a trailing '.' are ignored, as in lm-eval
    assert gsm8k.exact_match("7,2", ref) == 1.0  # ',' is ignored too
    assert gsm8k.exact_match("[invalid]", ref) == 0.0
    assert cut_at_stop(" 5\n\nQuestion: next", ("Question:", "</s>")) == " 5\n\n"


def test_gsm8k_fewshot_draws_are_lm_eval_sampler(data_dir):
    from lm_eval.api.samplers import ContextSampler

    train = gsm8k.read_records(data_dir / "gsm8k/train.jsonl")
    assert len(train) == 7473
    sampler = ContextSampler(train, rnd=1234)
    expected = [sampler.sample(8) for _ in range(3)]
    assert gsm8k.fewshot_draws(train, 3, 8, seed=1234) == expected
    prompt = gsm8k.build_prompt("What is 1+1?", expected[0][:2])
    first = expected[0][0]
    assert prompt.startswith(f"Question: {first['question']}\nAnswer: {first['answer']}\n\nQuestion: ")
    assert prompt.endswith("\n\nQuestion: What is 1+1?\nAnswer:")


def test_gsm8k_prompts_are_lm_eval_contexts(data_dir, tmp_path):
    """lm-eval 0.4.13's own gsm8k task (its YAML, dataset swapped for the local files), 8-shot, fewshot seed
    1234: the contexts it builds for the first 3 test items are rankwise's prompts, character for character."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    config = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"),
        "task": "gsm8k_local", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"cache_dir": str(tmp_path / "hf"), "data_files": {
            "train": str(data_dir / "gsm8k/train.jsonl"), "test": str(data_dir / "gsm8k/test.jsonl")}},
    }
    (tmp_path / "gsm8k_local.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["gsm8k_local"])["tasks"]
    task = next(iter(task.values()))
    task.set_config(key="num_fewshot", value=8)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=3, rank=0, world_size=1)
    theirs = [inst.args[0] for inst in task.instances]
    assert list(task.instances[0].args[1]["until"]) == list(gsm8k.UNTIL)

    test = gsm8k.read_records(data_dir / "gsm8k/test.jsonl")
    train = gsm8k.read_records(data_dir / "gsm8k/train.jsonl")
    draws = gsm8k.fewshot_draws(train, 3, 8, seed=1234)
    assert [gsm8k.build_prompt(test[i]["question"], draws[i]) for i in range(3)] == theirs


def test_greedy_generate_matches_hf_generate(smollm, one_thread):
    """Batched, left-padded, cached generation with per-row stopping gives model.generate's greedy text."""
    model, tokenizer, _ = smollm
    prompts = ["Question: What is 2 + 3?\nAnswer:", "The capital of France is"]
    ours = greedy_generate(model, tokenizer, prompts, until=["\n"], max_new_tokens=8, batch_size=2)
    for prompt, text in zip(prompts, ours, strict=True):
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        ref = cut_at_stop(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), ["\n"])
        assert text == ref


def test_gsm8k_two_item_run(smollm, data_dir, one_thread):
    """Two real test items, 1-shot: prompt format, filters and metrics fit together (generation capped at
    16 tokens here to keep the suite fast; the task's protocol uses lm-eval's 256)."""
    model, tokenizer, _ = smollm
    task = get_task("gsm8k")
    task.max_gen_toks = 16
    result = task.run(model, tokenizer, _opts(limit=2, shots=1, log_samples=True))
    test = gsm8k.read_records(data_dir / "gsm8k/test.jsonl")
    assert result.n == 2 and result.protocol["shots"] == 1
    assert set(result.metrics) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    for i, s in enumerate(result.samples):
        assert s["prompt"].endswith(f"Question: {test[i]['question']}\nAnswer:")
        assert s["prompt"].count("Question: ") == 2
        assert "Question:" not in s["generation"]
        assert s["strict-match"] == gsm8k.extract_strict(s["generation"])
        assert s["flexible-extract"] == gsm8k.extract_flexible(s["generation"])
        assert s["exact_match,flexible-extract"] == gsm8k.exact_match(s["flexible-extract"], test[i]["answer"])
    strict = [s["exact_match,strict-match"] for s in result.samples]
    assert result.metrics["exact_match,strict-match"] == pytest.approx(sum(strict) / 2)


# ----------------------------------------------------------------------------------- stsb


def test_stsb_minilm_first_200(minilm):
    model, tokenizer, info = minilm
    assert info.kind == "encoder"
    task = get_task("stsb")
    assert task.requires == "encoder"
    result = task.run(model, tokenizer, _opts(limit=200, batch_size=64))
    assert result.n == 200
    assert result.metrics["spearman"] > 0.7
    assert 0 < result.stderr["spearman"] < 0.05


def test_stsb_reads_rows_with_extra_columns(data_dir):
    from rankwise.evaluation.tasks.stsb import read_pairs

    pairs = read_pairs(data_dir / "stsb/sts-test.tsv")
    assert len(pairs) == 1379
    assert all(0.0 <= score <= 5.0 for _, _, score in pairs)
    assert pairs[0] == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)


# ----------------------------------------------------------------------------------- winogrande

WINO_RECORDS = [
    ("I poured the cold milk into the _ and drank it slowly.", "glass", "shoe", "1"),
    ("He could not read the small print because the _ was too dark to see anything.", "sun", "room", "2"),
    ("The ice cream melted quickly because the _ was very hot that afternoon.", "freezer", "weather", "2"),
    ("She unlocked the front door with her _ and walked inside the house.", "key", "banana", "1"),
    ("After running the marathon, the _ was exhausted and needed to rest.", "athlete", "chair", "1"),
    ("The baby started crying because the _ was hungry and wanted milk.", "baby", "table", "1"),
]


def test_winogrande_partial_scoring_on_handwritten_records(smollm, tmp_path):
    import lm_eval.tasks.winogrande.preprocess_winogrande as ref

    folder = tmp_path / "winogrande"
    folder.mkdir()
    docs = [{"qID": f"t{i}", "sentence": s, "option1": a, "option2": b, "answer": ans}
            for i, (s, a, b, ans) in enumerate(WINO_RECORDS)]
    (folder / "dev.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    for d in docs:  # the requests are lm-eval's: contexts from doc_to_choice, " " + doc_to_target
        expected = [(ctx, " " + ref.doc_to_target(d)) for ctx in ref.doc_to_choice(d)]
        assert winogrande.partial_requests(d["sentence"], (d["option1"], d["option2"])) == expected

    model, tokenizer, _ = smollm
    result = get_task("winogrande").run(model, tokenizer, _opts(data_dir=tmp_path))
    assert result.n == len(WINO_RECORDS)
    assert result.metrics["acc"] >= 4 / 6


def test_winogrande_rejects_a_record_without_answer(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": ""}) + "\n")
    with pytest.raises(DataError, match="answer must be"):
        winogrande.read_records(Path(path))


# ----------------------------------------------------------------------------------- lm-eval bindings


def test_every_lm_eval_binding_is_declared_by_its_task_and_names_an_existing_lm_eval_task():
    """harness.local_tasks() is the registry's declared bindings; each names a task file lm-eval ships and
    a split its records provide (ARC's conversion checked against the data)."""
    from rankwise.evaluation import harness
    from rankwise.evaluation.registry import task_names

    table = harness.local_tasks()
    assert {"arc_easy", "hellaswag", "piqa", "boolq", "openbookqa", "truthfulqa_mc1", "truthfulqa_mc2",
            "lambada_openai", "copa", "rte", "wsc", "mmlu_anatomy"} <= set(table)
    assert set(table) <= set(task_names()) and len([n for n in table if n.startswith("mmlu_")]) == 57
    root = harness._tasks_root()
    for name, binding in table.items():
        assert (root / binding.yaml).is_file(), (name, binding.yaml)
        assert binding.split in ("test", "validation")
    groups = harness._groups()
    assert groups["mmlu"] == ["mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"] or \
        sorted(groups["mmlu"]) == ["mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"]
    assert sum(len(groups[g]) for g in groups["mmlu"]) == 57
    records = table["arc_easy"].records(_opts())["test"]
    assert len(records) == 2376 and set(records[0]) == {"id", "question", "choices", "answerKey"}


def test_write_local_tasks_writes_yaml_including_lm_evals_task_and_the_converted_data(tmp_path):
    import yaml

    from rankwise.evaluation import harness

    local = harness.write_local_tasks(["copa", "mmlu_stem", "no_such_task"], _opts(), tmp_path)
    assert local == ["copa", "mmlu_stem"]
    copa = yaml.safe_load((tmp_path / "copa.yaml").read_text())
    assert Path(copa["include"]).is_file() and copa["include"].endswith("super_glue/copa/default.yaml")
    assert copa["validation_split"] == "validation" and copa["test_split"] is None
    rows = (tmp_path / "copa.validation.jsonl").read_text().splitlines()
    assert len(rows) == 100 and json.loads(rows[0])["premise"]
    group = yaml.safe_load((tmp_path / "_mmlu_stem.yaml").read_text())
    assert group["group"] == "mmlu_stem" and len(group["task"]) == 19
    assert (tmp_path / "mmlu_anatomy.yaml").is_file() and (tmp_path / "mmlu_anatomy.dev.jsonl").is_file()


def test_derived_values_are_made_once_only_with_a_cache():
    calls: list[int] = []
    make = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert [EvalOptions().derive(("k",), make) for _ in range(2)] == [1, 2]  # no cache: made every time
    options = EvalOptions(derived={})
    assert [options.derive(("k",), make) for _ in range(2)] == [3, 3] and options.derived == {("k",): 3}
    assert options == EvalOptions()  # the cache is not part of the options' identity
