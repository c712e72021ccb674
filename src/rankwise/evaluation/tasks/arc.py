"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge), as lm-eval 0.4.13's ``arc_easy``/``arc_challenge``.

Prompt ``"Question: {stem}\\nAnswer:"``, choices the answer texts, gold the index of ``answerKey`` among the
choice labels (A-E or 1-5); test split, 0-shot; ``acc`` and ``acc_norm``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, Records, register_task
from rankwise.evaluation.tasks.datafiles import read_jsonl
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask


def arc_doc(row: dict, doc_id: int, where: str) -> MCDoc:
    """One AI2-format record (``question.stem``, ``question.choices``, ``answerKey``) as a document."""
    try:
        question = row["question"]
        labels = [c["label"] for c in question["choices"]]
        texts = [c["text"] for c in question["choices"]]
        gold = labels.index(row["answerKey"])
        stem = question["stem"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: not an ARC record ({type(exc).__name__}: {exc})") from None
    return MCDoc(doc_id, f"Question: {stem}\nAnswer:", texts, gold, meta={"id": row.get("id")})


class _Arc(MultipleChoiceTask):
    """An ARC set, declared by its ``title`` ("ARC-Easy"): the file is ``arc-easy/ARC-Easy-Test.jsonl``."""

    title: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        path = f"{cls.title.lower()}/{cls.title}-Test.jsonl"
        cls.files = (path,)
        cls.source = f"{cls.title} test ({path})"
        cls.prompt_version = f"lm-eval 0.4.13 {cls.name} v1.0: 'Question: {{question}}\\nAnswer:' + ' ' + choice"

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path = self.data_path(options, self.files[0])
        return [arc_doc(row, i, f"{path} record {i}") for i, row in enumerate(read_jsonl(path))]

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding(f"arc/{self.name}.yaml", "test", self.lm_eval_records)

    def lm_eval_records(self, options: EvalOptions) -> Records:
        """allenai/ai2_arc's layout: id, question, choices {text, label}, answerKey."""
        rows = read_jsonl(self.data_path(options, self.files[0]))
        return {"test": [{"id": r["id"], "question": r["question"]["stem"],
                          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                      "label": [c["label"] for c in r["question"]["choices"]]},
                          "answerKey": r["answerKey"]} for r in rows]}


@register_task
class ArcEasy(_Arc):
    name = "arc_easy"
    title = "ARC-Easy"
    description = "ARC-Easy test, 4-5 way multiple choice science questions"


@register_task
class ArcChallenge(_Arc):
    name = "arc_challenge"
    title = "ARC-Challenge"
    description = "ARC-Challenge test, harder science questions"
