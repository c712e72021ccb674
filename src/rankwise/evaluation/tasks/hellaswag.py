"""HellaSwag validation, as lm-eval 0.4.13's ``hellaswag`` (acc and acc_norm, 0-shot, 4 endings).

The data file is the 6-lines-per-item text export (``activity_label: ctx``, gold, 4 endings). lm-eval builds
its prompt from the original fields: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``.
The export joined ``ctx_a`` and ``ctx_b`` and did *not* capitalize ``ctx_b`` (e.g. "... on a roof. he"
where lm-eval prompts "... on a roof. He"), so :func:`reconstruct` recovers the split: ``ctx_b`` is the
trailing lower-case fragment after the last sentence end (ActivityNet items; WikiHow items have an empty
``ctx_b``). lm-eval's ``preprocess`` is then applied to the prompt and the endings, as its
``process_docs`` does (it also removes the few bracketed spans the export kept, such as ``[www.kiddio.org]``).
"""

from __future__ import annotations

import re

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, register_task
from rankwise.evaluation.tasks.datafiles import read_lines
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask

RELATIVE_PATH = "hellaswag/hellaswag_val_full.txt.bz2"
_LINES_PER_ITEM = 6
_CTX_B = re.compile(r"^(?P<a>.*[.!?])\s+(?P<b>[a-z][^.!?]*)$", re.DOTALL)


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning: drop WikiHow bracket markup and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def split_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b): the trailing lower-case sentence fragment is ``ctx_b``, as in the original data."""
    m = _CTX_B.match(ctx)
    if m:
        return m.group("a"), m.group("b")
    if ctx[:1].islower() and not re.search(r"[.!?]", ctx):
        return "", ctx
    return ctx, ""


def reconstruct(lines: list[str], where: str) -> dict:
    """One exported item (6 lines) as the original record's fields: activity_label, ctx_a, ctx_b, endings, label."""
    if len(lines) != _LINES_PER_ITEM:
        raise DataError(f"{where}: expected {_LINES_PER_ITEM} lines per item, got {len(lines)}")
    label, sep, ctx = lines[0].partition(": ")
    if not sep or not lines[1].strip().isdigit() or not 0 <= int(lines[1]) < 4:
        raise DataError(f"{where}: expected 'activity_label: context' then a gold index 0-3")
    ctx_a, ctx_b = split_context(ctx)
    return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": lines[2:6],
            "label": lines[1].strip()}


def process_doc(doc: dict) -> tuple[str, list[str], int]:
    """lm-eval's ``process_docs``: (query, preprocessed endings, gold)."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = preprocess(doc["activity_label"] + ": " + ctx)
    return query, [preprocess(e) for e in doc["endings"]], int(doc["label"])


def load_records(path) -> list[dict]:
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % _LINES_PER_ITEM:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of {_LINES_PER_ITEM} (6 lines per item)")
    return [reconstruct(lines[i: i + _LINES_PER_ITEM], f"{path} item {i // _LINES_PER_ITEM}")
            for i in range(0, len(lines), _LINES_PER_ITEM)]


@register_task
class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    files = (RELATIVE_PATH,)
    description = "HellaSwag validation, commonsense sentence completion with 4 endings"
    source = f"HellaSwag validation, 10042 items ({RELATIVE_PATH}; ctx_a/ctx_b split recovered)"
    prompt_version = "lm-eval 0.4.13 hellaswag v1.0: preprocess(label + ': ' + ctx_a + ' ' + ctx_b.capitalize())"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("hellaswag/hellaswag.yaml", "validation",
                             lambda options: {"validation": load_records(self.data_path(options, RELATIVE_PATH))})

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        docs = []
        for i, rec in enumerate(load_records(self.data_path(options, RELATIVE_PATH))):
            query, endings, gold = process_doc(rec)
            docs.append(MCDoc(i, query, endings, gold))
        return docs
