"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge), as lm-eval 0.4.13's ``arc_easy``/``arc_challenge``.

Prompt ``"Question: {stem}\\nAnswer:"``, choices the answer texts, gold the index of ``answerKey`` among the
choice labels (A-E or 1-5); test split, 0-shot; ``acc`` and ``acc_norm``.
"""

from __future__ import annotations

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
    folder: str
    file: str

    def required_files(self) -> tuple[str, ...]:
        return (f"{self.folder}/{self.file}",)

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path = self.data_path(options, f"{self.folder}/{self.file}")
        return [arc_doc(row, i, f"{path} record {i}") for i, row in enumerate(read_jsonl(path))]

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding(f"arc/{self.name}.yaml", "test", self.lm_eval_records)

    def lm_eval_records(self, options: EvalOptions) -> Records:
        """allenai/ai2_arc's layout: id, question, choices {text, label}, answerKey."""
        rows = read_jsonl(self.data_path(options, f"{self.folder}/{self.file}"))
        return {"test": [{"id": r["id"], "question": r["question"]["stem"],
                          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                      "label": [c["label"] for c in r["question"]["choices"]]},
                          "answerKey": r["answerKey"]} for r in rows]}


@register_task
class ArcEasy(_Arc):
    name = "arc_easy"
    description = "ARC-Easy test, 4-5 way multiple choice science questions"
    folder, file = "arc-easy", "ARC-Easy-Test.jsonl"
    source = "ARC-Easy test (arc-easy/ARC-Easy-Test.jsonl)"
    prompt_version = "lm-eval 0.4.13 arc_easy v1.0: 'Question: {question}\\nAnswer:' + ' ' + choice"


@register_task
class ArcChallenge(_Arc):
    name = "arc_challenge"
    description = "ARC-Challenge test, harder science questions"
    folder, file = "arc-challenge", "ARC-Challenge-Test.jsonl"
    source = "ARC-Challenge test (arc-challenge/ARC-Challenge-Test.jsonl)"
    prompt_version = "lm-eval 0.4.13 arc_challenge v1.0: 'Question: {question}\\nAnswer:' + ' ' + choice"
