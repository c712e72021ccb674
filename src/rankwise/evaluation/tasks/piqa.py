"""PIQA validation, as lm-eval 0.4.13's ``piqa``: ``"Question: {goal}\\nAnswer:"``, two solutions, acc and acc_norm."""

from __future__ import annotations

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, register_task
from rankwise.evaluation.tasks.datafiles import read_jsonl, read_lines, require
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask


def load_records(questions, labels) -> list[dict]:
    """Questions (``goal``, ``sol1``, ``sol2``) joined with the separate label file, as lm-eval's layout."""
    rows = read_jsonl(questions)
    gold = [line.strip() for line in read_lines(labels) if line.strip()]
    if len(gold) != len(rows):
        raise DataError(f"{labels}: {len(gold)} labels for {len(rows)} questions in {questions}")
    out = []
    for i, (row, g) in enumerate(zip(rows, gold, strict=True)):
        require(row, ("goal", "sol1", "sol2"), f"{questions} record {i}")
        if g not in ("0", "1"):
            raise DataError(f"{labels}:{i + 1}: label must be 0 or 1, got {g!r}")
        out.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(g)})
    return out


@register_task
class Piqa(MultipleChoiceTask):
    name = "piqa"
    files = ("piqa/valid.jsonl", "piqa/valid-labels.lst")
    description = "PIQA validation, physical commonsense, 2 solutions"
    source = "PIQA validation, 1838 items (piqa/valid.jsonl + piqa/valid-labels.lst)"
    prompt_version = "lm-eval 0.4.13 piqa v1.0: 'Question: {goal}\\nAnswer:' + ' ' + solution"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("piqa/piqa.yaml", "validation", lambda options: {"validation": self.rows(options)})

    def rows(self, options: EvalOptions) -> list[dict]:
        return load_records(self.data_path(options, "piqa/valid.jsonl"),
                            self.data_path(options, "piqa/valid-labels.lst"))

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        rows = self.rows(options)
        return [MCDoc(i, f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])
                for i, r in enumerate(rows)]
