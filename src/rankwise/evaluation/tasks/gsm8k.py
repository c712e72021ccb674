"""GSM8K: few-shot greedy generation, exact match on the final number (lm-eval 0.4.13's ``gsm8k`` task).

Protocol, as lm-eval's ``gsm8k.yaml`` (version 3.0) runs it without a chat template:

* prompt: ``k`` exemplars ``"Question: {q}\\nAnswer: {full worked answer}\\n\\n"`` then
  ``"Question: {q}\\nAnswer:"``. The paper reports 8-shot, so rankwise defaults to 8 (lm-eval's YAML
  default is 5: pass ``shots=5`` for that number).
* exemplars: lm-eval's default sampler with its default fewshot seed 1234: one ``random.Random(seed)``
  draws ``rnd.sample(train, k)`` for each test item in order, so item i gets the i-th draw. rankwise makes
  the same draws from ``train.jsonl`` (same order as the HF ``openai/gsm8k`` train split); with ``limit``
  the first items get exactly lm-eval's exemplars.
* generation: greedy, at most 256 new tokens, stop at ``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` or EOS
  (0.4.13's YAML has no ``"\\n\\n"`` stop: a model that imitates the exemplars stops when it starts
  the next ``"Question:"``).
* scoring: two filters on the generation, then exact match against the reference after lm-eval's
  normalisation (lower case; remove ``,``, ``$``, everything up to ``"#### "``, a trailing ``.``):
  ``strict-match`` takes the first ``#### <number>``; ``flexible-extract`` takes the last number-like
  token anywhere. A generation without a match scores as ``[invalid]``.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

from rankwise.errors import DataError, RankwiseError
from rankwise.evaluation.generation import greedy_generate
from rankwise.evaluation.progress import task_progress
from rankwise.evaluation.registry import EvalOptions, Task, register_task
from rankwise.evaluation.results import TaskResult, mean_stderr
from rankwise.evaluation.tasks.datafiles import read_jsonl, require

DEFAULT_SHOTS = 8
MAX_GEN_TOKS = 256
UNTIL = ("Question:", "</s>", "<|im_end|>")
FALLBACK = "[invalid]"
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def read_records(path: Path) -> list[dict[str, str]]:
    """GSM8K records (``question``, ``answer``) of a JSONL file; a malformed one is a one-line DataError."""
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        require(row, ("question", "answer"), f"{path} record {i}")
    if not rows:
        raise DataError(f"{path} holds no GSM8K records")
    return [{"question": str(r["question"]), "answer": str(r["answer"])} for r in rows]


def question_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def build_prompt(question: str, exemplars: list[dict[str, str]]) -> str:
    """lm-eval's plain-text few-shot context: exemplar turns joined by the blank-line fewshot delimiter."""
    shots = "".join(f"{question_text(ex['question'])} {ex['answer']}\n\n" for ex in exemplars)
    return shots + question_text(question)


def fewshot_draws(train: list[dict[str, str]], n_items: int, shots: int, seed: int) -> list[list[dict[str, str]]]:
    """The exemplars lm-eval gives test items 0..n_items-1: consecutive ``rnd.sample`` draws of one RNG."""
    if shots > len(train):
        raise DataError(f"{shots} shots requested but the train file has {len(train)} records")
    rnd = random.Random(seed)
    return [rnd.sample(train, shots) if shots > 0 else [] for _ in range(n_items)]


def extract_strict(generation: str) -> str:
    """The number after the first ``#### `` (lm-eval's strict-match filter), else ``[invalid]``."""
    match = STRICT_PATTERN.findall(generation)
    return match[0].strip() if match else FALLBACK


def extract_flexible(generation: str) -> str:
    """The last number-like token (lm-eval's flexible-extract filter, group_select=-1), else ``[invalid]``."""
    matches = FLEXIBLE_PATTERN.findall(generation)
    if not matches:
        return FALLBACK
    groups = [g for g in matches[-1] if g]
    return groups[0].strip() if groups else FALLBACK


def normalize(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k: regexes_to_ignore, then lower case."""
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


@register_task
class GSM8K(Task):
    name = "gsm8k"
    kind = "generation"
    description = "GSM8K test, k-shot (default 8) greedy generation, exact match (strict / flexible), lm-eval 0.4.13"
    files = ("gsm8k/test.jsonl", "gsm8k/train.jsonl")
    max_gen_toks: int = MAX_GEN_TOKS  # lm-eval's default; an instance may lower it (the protocol records it)

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        shots = DEFAULT_SHOTS if options.shots is None else options.shots
        if shots < 0:
            raise RankwiseError(f"task gsm8k needs 0 or more shots, not {shots}")
        if options.seq_len is not None and options.seq_len <= self.max_gen_toks:
            raise RankwiseError(f"gsm8k needs --seq-len above {self.max_gen_toks} (room for the prompt and "
                                f"{self.max_gen_toks} generated tokens), got {options.seq_len}")
        test = read_records(self.data_path(options, "gsm8k/test.jsonl"))
        train = read_records(self.data_path(options, "gsm8k/train.jsonl")) if shots > 0 else []
        subset = self.subset(len(test), options)
        # lm-eval draws exemplars item by item in evaluation order (a sampled subset: in its sorted order).
        draws = fewshot_draws(train, len(subset.indices), shots, options.seed)
        prompts = [build_prompt(test[i]["question"], ex) for i, ex in zip(subset.indices, draws, strict=True)]

        start = time.perf_counter()
        with task_progress(self.name, len(prompts), options.progress) as advance:
            generations = greedy_generate(model, tokenizer, prompts, until=UNTIL, max_new_tokens=self.max_gen_toks,
                                          batch_size=options.batch_size, max_length=options.seq_len,
                                          progress=advance)
        seconds = time.perf_counter() - start

        strict, flexible, samples = [], [], []
        for i, prompt, gen in zip(subset.indices, prompts, generations, strict=True):
            ref = test[i]["answer"]
            s_pred, f_pred = extract_strict(gen), extract_flexible(gen)
            strict.append(exact_match(s_pred, ref))
            flexible.append(exact_match(f_pred, ref))
            record: dict[str, Any] = {"doc_id": i, "generation": gen, "target": ref, "strict-match": s_pred,
                                      "flexible-extract": f_pred, "exact_match,strict-match": strict[-1],
                                      "exact_match,flexible-extract": flexible[-1]}
            if options.log_samples:
                record["prompt"] = prompt
            samples.append(record)
        s_mean, s_err = mean_stderr(strict)
        f_mean, f_err = mean_stderr(flexible)
        return TaskResult(
            task=self.name,
            metrics={"exact_match,strict-match": s_mean, "exact_match,flexible-extract": f_mean},
            stderr={"exact_match,strict-match": s_err, "exact_match,flexible-extract": f_err},
            n=len(subset.indices),
            protocol={
                "source": f"GSM8K test, {len(test)} items (gsm8k/test.jsonl); exemplars from gsm8k/train.jsonl",
                "prompt": "lm-eval 0.4.13 gsm8k v3.0, plain text: 'Question: {question}\\nAnswer:'",
                "subset": subset.description,
                "shots": shots,
                "fewshot": f"lm-eval default sampler: random.Random({options.seed}).sample(train, {shots}), "
                           "one draw per evaluated item in order",
                "decoding": f"greedy, max {self.max_gen_toks} new tokens, stop at {list(UNTIL)} or EOS",
                "metrics": {
                    "exact_match,strict-match": "fraction whose first '#### <number>' equals the answer "
                                                "(lm-eval normalisation: case, ',', '$', trailing '.')",
                    "exact_match,flexible-extract": "fraction whose last number in the generation equals "
                                                    "the answer (same normalisation)",
                },
                "stderr": "sample std / sqrt(n)",
            },
            samples=samples,
            seconds=seconds,
        )
