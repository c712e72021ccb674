"""BoolQ dev (SuperGLUE), as lm-eval 0.4.13's ``boolq``: passage, question, choices no/yes; acc only."""

from __future__ import annotations

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, Records, register_task
from rankwise.evaluation.tasks.datafiles import read_jsonl, require
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask


def parse_bool(value: object, where: str) -> bool:
    """SuperGLUE labels come as JSON booleans or the strings "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{where}: label must be true or false, got {value!r}")


@register_task
class BoolQ(MultipleChoiceTask):
    name = "boolq"
    files = ("boolq/val.jsonl",)
    description = "BoolQ dev, yes/no questions about a passage"
    metric_names = ("acc",)
    source = "BoolQ dev (SuperGLUE), 3270 items (boolq/val.jsonl)"
    prompt_version = "lm-eval 0.4.13 boolq v2.0: '{passage}\\nQuestion: {question}?\\nAnswer:' + ' no'/' yes'"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("super_glue/boolq/default.yaml", "validation", self.lm_eval_records)

    def lm_eval_records(self, options: EvalOptions) -> Records:
        path = self.data_path(options, "boolq/val.jsonl")
        return {"validation": [{"question": r["question"], "passage": r["passage"], "idx": r.get("idx"),
                                "label": int(parse_bool(r["label"], str(path)))} for r in read_jsonl(path)]}

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path = self.data_path(options, "boolq/val.jsonl")
        docs = []
        for i, row in enumerate(read_jsonl(path)):
            where = f"{path} record {i}"
            require(row, ("passage", "question", "label"), where)
            gold = int(parse_bool(row["label"], where))
            docs.append(MCDoc(i, f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], gold,
                              meta={"idx": row.get("idx")}))
        return docs
