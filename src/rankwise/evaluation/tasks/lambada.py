"""LAMBADA (OpenAI version) test, as lm-eval 0.4.13's ``lambada_openai``.

Each passage's last word (after the last space) is the target: context ``" ".join(words[:-1])``,
continuation ``" " + last word``. ``acc``: the target is the model's greedy continuation, token by token;
``perplexity``: ``exp(-mean log-likelihood of the target)`` over the passages (lm-eval's aggregation; a
per-passage last-word perplexity, not a token perplexity of running text). lm-eval bootstraps the
perplexity's standard error; rankwise uses the delta method, ``ppl * stderr(mean log-likelihood)``.
"""

from __future__ import annotations

import math
from typing import Any

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, Task, register_task
from rankwise.evaluation.results import TaskResult, mean_stderr
from rankwise.evaluation.tasks.datafiles import read_jsonl
from rankwise.evaluation.tasks.multiple_choice import (
    ENGINE_NOTE,
    METRIC_DEFINITIONS,
    score_requests,
    strategy_protocol,
)

RELATIVE_PATH = "lambada/lambada_test.jsonl"


def split_last_word(text: str) -> tuple[str, str]:
    """lm-eval's (doc_to_text, doc_to_target): all words but the last, and ``" " + last word``."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


@register_task
class LambadaOpenAI(Task):
    name = "lambada_openai"
    kind = "loglikelihood"
    description = "LAMBADA (OpenAI) test: predict a passage's last word"
    files = (RELATIVE_PATH,)

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("lambada/lambada_openai.yaml", "test", lambda options: {
            "test": [{"text": r["text"]} for r in read_jsonl(self.data_path(options, RELATIVE_PATH))]})

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        if options.shots not in (None, 0):
            raise DataError(f"task {self.name} supports 0 shots here, not {options.shots}")
        path = self.data_path(options, RELATIVE_PATH)
        rows = read_jsonl(path)
        for i, row in enumerate(rows):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{path} record {i}: expected a 'text' string")
        subset = self.subset(len(rows), options)
        requests = [split_last_word(rows[i]["text"]) for i in subset.indices]
        results, strategy = score_requests(model, tokenizer, requests, options, self.name)
        lls = [r.logprob for r in results]
        hits = [float(r.is_greedy) for r in results]
        acc, acc_se = mean_stderr(hits)
        mean_ll, ll_se = mean_stderr(lls)
        ppl = math.exp(-mean_ll)
        samples = []
        for i, (ctx, target), r in zip(subset.indices, requests, results, strict=True):
            rec: dict[str, Any] = {"doc_id": i, "target": target, "loglikelihood": r.logprob,
                                   "is_greedy": r.is_greedy, "target_tokens": r.n_tokens}
            if options.log_samples:
                rec["context"] = ctx
            samples.append(rec)
        protocol = {
            "shots": 0,
            "subset": subset.description,
            "source": f"LAMBADA OpenAI test, 5153 passages ({RELATIVE_PATH})",
            "prompt": "lm-eval 0.4.13 lambada_openai v1.0: words[:-1] joined by ' ', target ' ' + last word",
            "metrics": {
                "acc": METRIC_DEFINITIONS["greedy_acc"],
                "perplexity": METRIC_DEFINITIONS["perplexity"] + "; stderr by the delta method",
            },
            "scoring": ENGINE_NOTE,
            **strategy_protocol(strategy),
        }
        return TaskResult(
            task=self.name, metrics={"acc": acc, "perplexity": ppl},
            stderr={"acc": acc_se, "perplexity": None if ll_se is None else ppl * ll_se},
            n=len(requests), protocol=protocol, samples=samples,
        )
