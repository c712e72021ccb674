"""OpenBookQA main test, as lm-eval 0.4.13's ``openbookqa``: the bare question stem, 4 choices, acc and acc_norm.

The data file is the TSV export (``ID``, ``Question Stem``, ``Choices`` as ``(A) … (B) …``, ``Answer Key``);
:func:`parse_choices` recovers the labelled choices of the original ``choices.text``/``choices.label``.
"""

from __future__ import annotations

import re

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, register_task
from rankwise.evaluation.tasks.datafiles import read_csv, require
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask

_LABEL = re.compile(r"\(([A-Z])\)\s")


def parse_choices(text: str, where: str) -> tuple[list[str], list[str]]:
    """``"(A) x (B) y"`` -> (labels, texts)."""
    marks = list(_LABEL.finditer(text))
    if len(marks) < 2 or marks[0].start() != 0:
        raise DataError(f"{where}: choices must look like '(A) ... (B) ...', got {text[:60]!r}")
    labels = [m.group(1) for m in marks]
    ends = [m.start() for m in marks[1:]] + [len(text)]
    texts = [text[m.end(): e].strip() for m, e in zip(marks, ends, strict=True)]
    return labels, texts


def load_records(path) -> list[dict]:
    """Rows in lm-eval's layout: ``id``, ``question_stem``, ``choices{text,label}``, ``answerKey``."""
    out = []
    for i, row in enumerate(read_csv(path, delimiter="\t")):
        where = f"{path} row {i + 2}"
        require(row, ("ID", "Question Stem", "Choices", "Answer Key"), where)
        labels, texts = parse_choices(row["Choices"], where)
        out.append({"id": row["ID"], "question_stem": row["Question Stem"],
                    "choices": {"text": texts, "label": labels}, "answerKey": row["Answer Key"]})
    return out


@register_task
class OpenBookQA(MultipleChoiceTask):
    name = "openbookqa"
    files = ("openbookqa/test.tsv",)
    description = "OpenBookQA main test, elementary science with 4 choices"
    source = "OpenBookQA main test, 500 items (openbookqa/test.tsv)"
    prompt_version = "lm-eval 0.4.13 openbookqa v1.0: '{question_stem}' + ' ' + choice"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("openbookqa/openbookqa.yaml", "test", lambda options: {
            "test": load_records(self.data_path(options, "openbookqa/test.tsv"))})

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path = self.data_path(options, "openbookqa/test.tsv")
        docs = []
        for i, r in enumerate(load_records(path)):
            key = r["answerKey"].strip()
            if key not in r["choices"]["label"]:
                raise DataError(f"{path} row {i + 2}: answer key {key!r} is not one of the choices")
            docs.append(MCDoc(i, r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(key),
                              meta={"id": r["id"]}))
        return docs
