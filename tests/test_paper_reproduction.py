"""``docs/paper-reproduction.md`` from a paper output folder: a synthetic folder (results.json,
encoder-results.json, headlines.json and two figure files shaped as a real run writes them), the document's
sections, its numbers against the JSON, the verdict rules, missing sweeps, the atomic write with its assets,
and the CLI's regenerate path. Fast: no model, nothing runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import run_cli
from rankwise.errors import RankwiseError
from rankwise.paper import reproduction as rp
from rankwise.paper.headlines import headlines
from rankwise.paper.reproduction import (
    FAILS,
    HOLDS,
    UNSURE,
    directional_verdict,
    equivalence_verdict,
    reproduction_markdown,
    write_reproduction,
)

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
SECTIONS = ["## a. Ranks can be cut to 1", "## b. Early layers are sensitive", "## c. Adjacent layers are sensitive",
            "## d. The 9%-size point costs 4-10 accuracy points", "## e. Latency and energy fall with size",
            "## f. Rank 1 on whole layers vs removing them", "## g. The encoder case", "## Not run in this mode"]


def _trial(number, sweep, x, reduction, acc, se=0.01, n=400, eff=None, plan=None, label=None, state="COMPLETE"):
    metrics = {k: {"metric": "acc", "value": acc + 0.01 * i, "stderr": se, "n": n, "chance": 0.25,
                   "protocol": "0-shot"} for i, k in enumerate(TASKS)}
    metrics["wikitext"] = {"metric": "token_perplexity", "value": 20.0 + 100 * (0.6 - acc), "stderr": 0.5, "n": 1,
                           "protocol": "token-level, seq_len 256"}
    return {"number": number, "state": state, "sweep": sweep, "label": label or f"n={x}", "x": x,
            "plan": plan, "kind": "decompose", "params_ratio": 1 - reduction, "size_reduction": reduction,
            "metrics": metrics, "efficiency": eff, "error": None if state == "COMPLETE" else "boom"}


def _eff(change, iqr=1.0):
    return {"decode_ms": 10.0 * (1 + change), "decode_ms_dense": 10.0, "latency_change": change,
            "decode_ms_iqr_pct": iqr, "ideal_latency_change": -0.05, "energy_j": None, "energy_change": None,
            "energy_reason": "no RAPL counter readable", "protocol": "decode batch 1, 16 tokens after 64, "
                                                                     "2 thread(s), median of 3 (1 warm-up)"}


def _decoder_doc():
    trials = []
    num = iter(range(100))
    for n, red, acc in ((1, 0.03, 0.58), (3, 0.09, 0.52), (6, 0.18, 0.40)):
        trials.append(_trial(next(num), "layer-count", n, red, acc, eff=_eff(-0.04 if n == 3 else -0.01),
                             plan={"method": "tucker", "rank": 1, "layers": list(range(n)), "tensors": "all"}))
    for n, red, acc in ((1, 0.03, 0.575), (3, 0.09, 0.515), (6, 0.18, 0.30)):
        trials.append(_trial(next(num), "layer-removal", n, red, acc, label=f"n={n}"))
    for r, red, acc in ((1, 0.09, 0.52), (8, 0.08, 0.53), (0.25, 0.04, 0.59)):
        trials.append(_trial(next(num), "rank-sweep", r, red, acc, label=f"r={r}",
                             plan={"method": "tucker", "rank": r, "layers": [5, 15, 25], "tensors": "all"}))
    for layer, acc in ((0, 0.30), (1, 0.35), (15, 0.58), (29, 0.59)):
        trials.append(_trial(next(num), "single-layer", layer, 0.03, acc, label=f"L{layer}",
                             plan={"method": "tucker", "rank": 1, "layers": [layer], "tensors": "all"}))
    for s, acc in ((4, 0.55), (1, 0.45)):
        trials.append(_trial(next(num), "layer-density", s, 0.09, acc, label=f"s={s}",
                             plan={"method": "tucker", "rank": 1, "layers": [15 - s, 15, 15 + s], "tensors": "all"}))
    trials.append(_trial(next(num), "tensor-sensitivity", None, 0.05, 0.5, label="attn@all"))
    trials.append(_trial(next(num), "layer-density", 2, 0.09, 0.5, label="s=2", state="FAIL"))
    dense = _trial(None, "dense", None, 0.0, 0.60)
    dense.update(kind="dense", plan=None, label="dense")
    spec = {"name": "paper-quick-smollm2-135m-decoder", "model": "smollm2-135m", "threads": 2,
            "tasks": [{"name": k, "limit": None, "sample": 400, "seed": 1234, "shots": None} for k in TASKS],
            "perplexity": {"windows": 1, "seq_len": 256}}
    return {"schema": "rankwise.study/1", "study": spec["name"], "spec": spec, "dense": dense, "trials": trials,
            "environment": {"model": "smollm2-135m", "dtype": "float32", "device": "cpu", "threads": 2,
                            "versions": {"rankwise": "0.1", "torch": "2.5"}}}


def _encoder_doc():
    def rec(number, n, value, red):
        return {"number": number, "state": "COMPLETE", "sweep": "layer-count" if n else "dense", "x": n,
                "label": f"n={n}", "size_reduction": red,
                "metrics": {"stsb": {"metric": "spearman", "value": value, "stderr": 0.02, "n": 200}}}

    return {"schema": "rankwise.study/1", "study": "paper-quick-minilm-l6-encoder", "spec": {"model": "minilm-l6"},
            "dense": rec(None, None, 0.80, 0.0),
            "trials": [rec(0, 1, 0.78, 0.1), rec(1, 2, 0.70, 0.2), rec(2, 3, 0.55, 0.3)]}


@pytest.fixture
def paper_out(tmp_path):
    out = tmp_path / "paperq"
    (out / "report" / "figures").mkdir(parents=True)
    (out / "encoder-report" / "figures").mkdir(parents=True)
    (out / "report" / "figures" / "accuracy-vs-size-layer-count.png").write_bytes(b"\x89PNG fake")
    (out / "report" / "figures" / "accuracy-vs-size-layer-count.svg").write_text("<svg/>")
    (out / "encoder-report" / "figures" / "accuracy-vs-size-layer-count.png").write_bytes(b"\x89PNG enc")
    (out / "results.json").write_text(json.dumps(_decoder_doc()))
    (out / "encoder-results.json").write_text(json.dumps(_encoder_doc()))
    (out / "headlines.json").write_text(json.dumps({
        "schema": "rankwise.paper/1", "mode": "quick", "model": "smollm2-135m",
        "notes": ["winogrande skipped: its data is not in the data directory",
                  "gsm8k only in --full: generating answers is too slow on CPU cores for this mode"],
        "points": {}, "headlines": {"lines": [], "numbers": {}}}))
    return out


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_claim_section_and_the_header(paper_out):
    text = reproduction_markdown(paper_out)
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "mode: quick" in text and "smollm2-135m" in text and "minilm-l6" in text
    assert "arc_easy 400 items" in text and "seed(s) 1234" in text and "2 thread(s)" in text
    assert "`acc` (not `acc_norm`)" in text and "token-level perplexity" in text
    assert f"`rankwise paper --quick -o {paper_out} --doc PATH`" in text
    assert f"rankwise paper --from-results -o {paper_out} --doc PATH" in text
    assert text.count("**Verdict:") == 7


def test_numbers_match_the_json(paper_out):
    text = reproduction_markdown(paper_out)
    nine = _section(text, "## d.")
    # the point nearest 9%: layer-count n=3 (trial #1); ARC-E dense 60.0, point 52.0, change -8.0, paper 66.2
    assert "trial #1, n=3" in nine
    assert "| ARC-Easy | acc | 60.0 ± 1.0 | 52.0 ± 1.0 | -8.0 ± 1.4 | 400 | 66.2 |" in nine
    assert "| ARC-Challenge | acc | 61.0 ± 1.0 | 53.0 ± 1.0 | -8.0 ± 1.4 | 400 | 36.4 |" in nine
    assert "30.7*" in nine and "token-level perplexity" in nine
    assert "Mean loss 8.0 ± 0.6 points" in nine and f"**Verdict: {HOLDS}.**" in nine
    latency = _section(text, "## e.")
    assert "| #1 | n=3 | -9.0% | 9.60 | 10.00 | -4.0% | 1% | -5.0% | not measured |" in latency
    assert "no RAPL counter readable" in latency and "-2.1% to -5.4%" in latency
    assert f"**Verdict: {HOLDS}.**" in latency and "fell at 3 of 3" in latency
    removal = _section(text, "## f.")
    assert "| 3 | #1 / #4 | -9.0% / -9.0% | 54.5 ± 0.4 | 54.0 ± 0.4 | +0.5 ± 0.6 |" in removal
    enc = _section(text, "## g.")
    assert "| #2 | 3 | -30.0% | 0.550 ± 0.020 | -0.250 |" in enc and "n=200" in enc
    assert f"**Verdict: {HOLDS}.**" in enc
    early = _section(text, "## b.")
    assert "| #9 | 0 | 32.5 ± 0.4 | -30.0 ± 0.6 |" in early and f"**Verdict: {HOLDS}.**" in early
    adjacent = _section(text, "## c.")
    assert "Spacing 1 minus spacing 4: -10.0 ± 0.6 points" in adjacent and f"**Verdict: {HOLDS}.**" in adjacent
    rank = _section(text, "## a.")  # rank 1 vs the best larger rank (25%): -7 points beyond 2 stderr
    assert "r=0.25" in rank and f"**Verdict: {FAILS}.**" in rank
    rest = _section(text, "## Not run")
    assert "winogrande skipped" in rest and "gsm8k only in --full" in rest and "takes days" in rest
    assert "trial #16 (layer-density s=2) is FAIL: boom" in rest


def test_verdict_rules():
    assert directional_verdict(-0.05, 0.02, -1) == HOLDS
    assert directional_verdict(-0.03, 0.02, -1) == UNSURE  # within 2 stderr
    assert directional_verdict(0.05, 0.02, -1) == FAILS
    assert directional_verdict(-0.05, None, -1) == UNSURE
    assert equivalence_verdict(0.001, 0.005) == HOLDS  # interval within ±2 points
    assert equivalence_verdict(0.01, 0.02) == UNSURE  # within 2 stderr but too noisy to call equal
    assert equivalence_verdict(0.05, 0.02) == FAILS


def test_within_two_stderr_is_inconclusive_in_the_document(paper_out):
    doc = json.loads((paper_out / "results.json").read_text())
    for t in doc["trials"]:
        if t["sweep"] == "layer-density":
            for m in t["metrics"].values():
                m["stderr"] = 0.2  # the 10-point difference is now within 2 standard errors
    (paper_out / "results.json").write_text(json.dumps(doc))
    assert f"**Verdict: {UNSURE}.**" in _section(reproduction_markdown(paper_out), "## c.")



def test_latency_verdict_refuses_a_drifting_machine_and_a_change_beyond_the_ideal(paper_out):
    doc = json.loads((paper_out / "results.json").read_text())
    timed = [t for t in doc["trials"] if t["sweep"] == "layer-count"]
    timed[0]["efficiency"]["decode_ms_dense"] = 14.0  # the dense model re-timed 40% slower after one trial
    (paper_out / "results.json").write_text(json.dumps(doc))
    latency = _section(reproduction_markdown(paper_out), "## e.")
    assert f"**Verdict: {UNSURE}.**" in latency and "ranged 10.0-14.0 ms/token" in latency
    assert "NOT EVIDENCE" in headlines(doc)["lines"][2]
    timed[0]["efficiency"]["decode_ms_dense"] = 10.0
    timed[1]["efficiency"].update(latency_change=-0.30, decode_ms=7.0)  # the 9% point: 30% faster, ideal -5%
    (paper_out / "results.json").write_text(json.dumps(doc))
    latency = _section(reproduction_markdown(paper_out), "## e.")
    assert f"**Verdict: {UNSURE}.**" in latency and "beyond the memory-bound ideal (-5.0%)" in latency

def test_a_missing_sweep_and_encoder_say_so(paper_out):
    doc = json.loads((paper_out / "results.json").read_text())
    doc["trials"] = [t for t in doc["trials"] if t["sweep"] != "rank-sweep"]
    doc["trials"][0]["efficiency"] = None
    (paper_out / "results.json").write_text(json.dumps(doc))
    (paper_out / "encoder-results.json").unlink()
    text = reproduction_markdown(paper_out, mode="standard")
    assert "No completed trial of the `rank-sweep` sweep: the run has no trial of it." in _section(text, "## a.")
    assert "Not measured: encoder-results.json is not in the output folder" in _section(text, "## g.")
    assert "mode: standard" in text and "this is a --standard run" in text
    assert "| #0 | n=1 | -3.0% | n/a | n/a | n/a | n/a | n/a | not measured |" in text


def test_write_is_atomic_and_copies_what_the_document_references(paper_out, tmp_path, monkeypatch):
    dest = tmp_path / "docs" / "paper-reproduction.md"
    assets = write_reproduction(paper_out, dest)
    assert assets == tmp_path / "docs" / "paper-reproduction"
    text = dest.read_text()
    assert text == reproduction_markdown(paper_out)
    for rel in ("results.json", "encoder-results.json", "headlines.json", "figures/accuracy-vs-size-layer-count.png",
                "figures/accuracy-vs-size-layer-count.svg", "encoder-figures/accuracy-vs-size-layer-count.png"):
        assert (assets / rel).is_file(), rel
        assert f"paper-reproduction/{rel}" in text or rel.endswith(".json")
    assert (assets / "results.json").read_bytes() == (paper_out / "results.json").read_bytes()
    assert "_Figure 'Layer × role sensitivity': not drawn" in text  # the report lacks it: said, not linked
    # a failing write leaves the previous document whole, and no temp file behind
    old = dest.read_text()
    monkeypatch.setattr(rp, "_build", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_reproduction(paper_out, dest)
    assert dest.read_text() == old
    monkeypatch.undo()
    real_write = Path.write_text

    def broken(self, *a, **k):
        real_write(self, "half", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError):
        write_reproduction(paper_out, dest)
    monkeypatch.undo()
    assert dest.read_text() == old
    assert not [p for p in os.listdir(dest.parent) if p.startswith(".")]


def test_write_refuses_an_assets_folder_it_did_not_write(paper_out, tmp_path):
    dest = tmp_path / "paper-reproduction.md"
    (tmp_path / "paper-reproduction").mkdir()
    (tmp_path / "paper-reproduction" / "notes.txt").write_text("mine")
    with pytest.raises(RankwiseError, match="did not write"):
        write_reproduction(paper_out, dest)
    assert not dest.exists()


def test_cli_regenerates_from_results(paper_out, tmp_path, capsys):
    dest = tmp_path / "doc" / "repro.md"
    code, stdout, stderr = run_cli(["paper", "--from-results", "-o", str(paper_out), "--doc", str(dest)], capsys)
    assert code in (0, None), stderr
    assert dest.read_text() == reproduction_markdown(paper_out, assets="repro")
    assert str(dest) in stdout and (tmp_path / "doc" / "repro" / "results.json").is_file()


def test_cli_missing_folder_is_one_line_error(tmp_path, capsys):
    code, _, stderr = run_cli(["paper", "--from-results", "-o", str(tmp_path / "nope"), "--doc",
                               str(tmp_path / "d.md")], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "is not a folder" in stderr
    code, _, stderr = run_cli(["paper", "--from-results", "-o", str(tmp_path)], capsys)
    assert code == 2 and "give --doc PATH" in stderr
    code, _, stderr = run_cli(["paper", "--from-results", "-o", str(tmp_path), "--doc", str(tmp_path / "d.md")],
                              capsys)
    assert code == 2 and stderr.count("\n") == 1 and "results.json not found" in stderr


def test_a_task_without_stderr_gets_the_binomial_one(paper_out):
    doc = json.loads((paper_out / "results.json").read_text())
    doc["dense"]["metrics"]["mmlu"]["stderr"] = None  # MMLU's group reports none
    (paper_out / "results.json").write_text(json.dumps(doc))
    nine = _section(reproduction_markdown(paper_out), "## d.")
    se = 100 * (0.63 * 0.37 / 399) ** 0.5  # sqrt(p(1-p)/(n-1)), as rankwise.paper.headlines computes it
    assert f"| MMLU | acc | 63.0 ± {se:.1f} |" in nine


def test_a_bad_doc_path_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import rankwise.cli.paper_cmd as paper_cmd

    def no_model(model):
        raise AssertionError("the model was loaded before --doc was checked")

    monkeypatch.setattr(paper_cmd, "_shape", no_model)
    code, _, stderr = run_cli(["paper", "--quick", "-o", str(tmp_path / "out"), "--doc", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in stderr and stderr.count("\n") == 1
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    code, _, stderr = run_cli(["paper", "-o", str(tmp_path / "out"), "--doc", str(tmp_path / "d.md")], capsys)
    assert code == 2 and "did not write (mine.txt)" in stderr
