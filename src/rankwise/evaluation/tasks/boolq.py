"""BoolQ dev (SuperGLUE), as lm-eval 0.4.13's ``boolq``: passage, question, choices no/yes; acc only."""

from __future__ import annotations

from typing import Any

from rankwise.evaluation.registry import register_task
from rankwise.evaluation.tasks.superglue import SuperGlueTask, parse_bool


@register_task
class BoolQ(SuperGlueTask, name="boolq", files=("boolq/val.jsonl",), choices=("no", "yes"),
            template="{passage}\nQuestion: {question}?\nAnswer:",
            description="BoolQ dev, yes/no questions about a passage",
            source="BoolQ dev (SuperGLUE), 3270 items (boolq/val.jsonl)",
            prompt_version="lm-eval 0.4.13 boolq v2.0: '{passage}\\nQuestion: {question}?\\nAnswer:' + ' no'/' yes'"):
    def record(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        return {"question": row["question"], "passage": row["passage"], "idx": row.get("idx"),
                "label": int(parse_bool(row["label"], where))}
