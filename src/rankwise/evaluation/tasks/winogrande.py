"""WinoGrande dev (winogrande_xl validation), zero-shot ``acc`` with lm-eval 0.4.13's partial scoring.

Each sentence has one blank ``_`` and two options. lm-eval does not score the options themselves: it puts
each option into the blank to form two *contexts* (the sentence up to the blank, option substituted) and
scores the same *continuation* after both (a space, then the rest of the sentence after the blank,
stripped). The option whose context makes the rest of the sentence more likely wins (``acc``; ties go
to option 1, as ``numpy.argmax``). The likelihoods come from :mod:`rankwise.evaluation.engine`, the same
scorer as the multiple-choice tasks.

The data is the published ``dev.jsonl`` (fields ``sentence``, ``option1``, ``option2``, ``answer`` "1" or
"2"), read from ``winogrande/dev.jsonl`` in the data directory. No copy ships with the benchmark data
here (public copies are Git LFS pointers): a user who has the file places it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankwise.errors import DataError, RankwiseError
from rankwise.evaluation.registry import EvalOptions, Task, register_task
from rankwise.evaluation.results import TaskResult, mean_stderr
from rankwise.evaluation.tasks.datafiles import read_jsonl, require
from rankwise.evaluation.tasks.multiple_choice import argmax, score_requests, strategy_protocol

DATA_FILE = "winogrande/dev.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """WinoGrande records with a blank and a gold answer; anything else is a one-line DataError."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no WinoGrande records")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} record {i}"
        require(row, ("sentence", "option1", "option2", "answer"), where)
        if "_" not in str(row["sentence"]):
            raise DataError(f"{where}: sentence has no '_' blank")
        answer = str(row["answer"]).strip()
        if answer not in ("1", "2"):
            raise DataError(f"{where}: answer must be '1' or '2', got {row['answer']!r}")
        out.append({"sentence": str(row["sentence"]), "option1": str(row["option1"]),
                    "option2": str(row["option2"]), "gold": int(answer) - 1})
    return out


def partial_requests(sentence: str, options: tuple[str, str]) -> list[tuple[str, str]]:
    """lm-eval's (context, continuation) per option: the option fills the blank, the rest is scored."""
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1 :].strip()
    return [(sentence[:blank] + option, continuation) for option in options]


@register_task
class WinoGrande(Task):
    name = "winogrande"
    kind = "loglikelihood"
    description = "WinoGrande dev (xl validation), zero-shot acc, partial scoring as lm-eval 0.4.13"
    files = (DATA_FILE,)

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        if options.shots:
            raise RankwiseError("task winogrande supports 0 shots here (few-shot needs the train split)")
        records = read_records(self.data_path(options, DATA_FILE))
        subset = self.subset(len(records), options)
        chosen = [records[i] for i in subset.indices]
        requests = [req for r in chosen for req in partial_requests(r["sentence"], (r["option1"], r["option2"]))]
        results, strategy = score_requests(model, tokenizer, requests, options, self.name)
        accs, samples = [], []
        for k, (i, rec) in enumerate(zip(subset.indices, chosen, strict=True)):
            lls = [results[2 * k].logprob, results[2 * k + 1].logprob]
            pred = argmax(lls)
            accs.append(float(pred == rec["gold"]))
            sample: dict[str, Any] = {"doc_id": i, "gold": rec["gold"], "loglikelihoods": lls, "pred": pred,
                                      "acc": accs[-1]}
            if options.log_samples:
                sample["requests"] = requests[2 * k : 2 * k + 2]
            samples.append(sample)
        acc, err = mean_stderr(accs)
        return TaskResult(
            task=self.name,
            metrics={"acc": acc},
            stderr={"acc": err},
            n=len(chosen),
            protocol={
                "source": f"WinoGrande dev / winogrande_xl validation, {len(records)} items ({DATA_FILE})",
                "prompt": "lm-eval 0.4.13 winogrande v1.0: context = sentence up to '_' + option, "
                          "continuation = ' ' + rest of the sentence (partial scoring)",
                "shots": 0,
                "subset": subset.description,
                "metrics": {"acc": "the option whose context gives the continuation the higher summed "
                                   "log-likelihood is the gold one (fraction)"},
                "stderr": "sample std / sqrt(n)",
                "scoring": "rankwise.evaluation.engine (lm-eval HFLM loglikelihood semantics)",
                **strategy_protocol(strategy),
            },
            samples=samples,
        )
