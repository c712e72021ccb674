"""SuperGLUE COPA, RTE and WSC validation sets, as lm-eval 0.4.13's ``copa``, ``sglue_rte`` and ``wsc``.

RTE is registered as ``rte`` (the name most papers use; lm-eval's GLUE ``rte`` has the same prompt, choices
and 277 validation pairs as its SuperGLUE ``sglue_rte``) and also as ``sglue_rte``. WSC follows lm-eval's
``wsc`` task, which reads the ``wsc.fixed`` configuration: :func:`fix_wsc_spans` applies the same span fixes
to the original release file. All three report ``acc`` only, as lm-eval does.
"""

from __future__ import annotations

import re
from typing import Any

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, Records, register_task
from rankwise.evaluation.tasks.boolq import parse_bool
from rankwise.evaluation.tasks.datafiles import read_jsonl, require
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask


def _rows(task: MultipleChoiceTask, options: EvalOptions, folder: str) -> tuple[Any, list[dict]]:
    path = task.data_path(options, f"superglue/{folder}/val.jsonl")
    return path, read_jsonl(path)


# ------------------------------------------------------------------------------------------------- COPA


def copa_doc(row: dict[str, Any], doc_id: int) -> MCDoc:
    """lm-eval's COPA: premise without its final period + " because"/" therefore"; choices lower-cased first
    letter with a leading space (so the request continuation starts with two spaces, as in lm-eval)."""
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]

    def lower_first(s: str) -> str:
        return s[0].lower() + s[1:]

    choices = [" " + lower_first(row["choice1"]), " " + lower_first(row["choice2"])]
    return MCDoc(doc_id, row["premise"].strip()[:-1] + f" {connector}", choices, int(row["label"]),
                 meta={"idx": row.get("idx")})


@register_task
class Copa(MultipleChoiceTask):
    name = "copa"
    files = ("superglue/COPA/val.jsonl",)
    description = "SuperGLUE COPA validation: choose the cause or effect"
    metric_names = ("acc",)
    source = "SuperGLUE COPA validation, 100 items (superglue/COPA/val.jsonl)"
    prompt_version = "lm-eval 0.4.13 copa v1.0: premise[:-1] + ' because'/' therefore' + '  ' + choice"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("super_glue/copa/default.yaml", "validation",
                             lambda options: {"validation": _rows(self, options, "COPA")[1]})

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path, rows = _rows(self, options, "COPA")
        docs = []
        for i, row in enumerate(rows):
            require(row, ("premise", "choice1", "choice2", "question", "label"), f"{path} record {i}")
            if row["question"] not in ("cause", "effect") or row["label"] not in (0, 1):
                raise DataError(f"{path} record {i}: question must be cause/effect and label 0/1")
            docs.append(copa_doc(row, i))
        return docs


# ------------------------------------------------------------------------------------------------- RTE


@register_task
class Rte(MultipleChoiceTask):
    name = "rte"
    files = ("superglue/RTE/val.jsonl",)
    description = "RTE (SuperGLUE/GLUE) validation: does the premise entail the hypothesis?"
    metric_names = ("acc",)
    source = "RTE validation, 277 pairs (superglue/RTE/val.jsonl; same pairs as GLUE RTE dev)"
    prompt_version = "lm-eval 0.4.13 sglue_rte v0.0 / rte v1.0: '{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:'"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("super_glue/rte/default.yaml", "validation", self.lm_eval_records)

    def lm_eval_records(self, options: EvalOptions) -> Records:
        labels = {"entailment": 0, "not_entailment": 1}
        return {"validation": [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": labels[r["label"]],
                                "idx": r.get("idx")} for r in _rows(self, options, "RTE")[1]]}

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path, rows = _rows(self, options, "RTE")
        labels = {"entailment": 0, "not_entailment": 1}
        docs = []
        for i, row in enumerate(rows):
            require(row, ("premise", "hypothesis", "label"), f"{path} record {i}")
            if row["label"] not in labels:
                raise DataError(f"{path} record {i}: label must be entailment or not_entailment")
            docs.append(MCDoc(i, f"{row['premise']}\nQuestion: {row['hypothesis']} True or False?\nAnswer:",
                              ["True", "False"], labels[row["label"]], meta={"idx": row.get("idx")}))
        return docs


@register_task
class SglueRte(Rte):
    name = "sglue_rte"
    description = "RTE under lm-eval's SuperGLUE name (same task as rte)"


# ------------------------------------------------------------------------------------------------- WSC


def fix_wsc_spans(ex: dict[str, Any]) -> dict[str, Any]:
    """The ``wsc.fixed`` corrections of the Hugging Face/TFDS SuperGLUE loader: make each span's text a
    substring of the passage (case of the first word, trailing period, newlines). Behaviour-for-behaviour
    the same as that loader, including leaving the two spans it cannot fix untouched."""
    ex = dict(ex)
    for k in ("span1", "span2"):
        text, index = ex[f"{k}_text"], ex[f"{k}_index"]
        if text in ex["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in text:
            ex["span2_index"] = 10  # the loader's fix; its text replacement is a no-op (result discarded)
        first_word = ex["text"].split()[index]
        text = (text[0].lower() if first_word[0].islower() else text[0].upper()) + text[1:]
        text = text.rstrip(".").replace("\n", " ")
        ex[f"{k}_text"] = text
    return ex


def detokenize(text: str) -> str:
    """lm-eval's ``general_detokenize``: undo the space-separated punctuation of tokenized text."""
    text = text.replace(" n't", "n't").replace(" )", ")").replace("( ", "(")
    text = text.replace('" ', '"').replace(' "', '"')
    return re.sub(r" (['.,])", r"\1", text)


def wsc_text(ex: dict[str, Any]) -> str:
    """lm-eval's WSC prompt: the passage with the pronoun starred, then the yes/no question."""
    raw = ex["text"]
    pre = " ".join(raw.split()[: ex["span2_index"]])
    post = raw[len(pre) + len(ex["span2_text"]) + 1:]
    passage = detokenize(pre + f" *{ex['span2_text']}*" + post)
    return (f"Passage: {passage}\n"
            f'Question: In the passage above, does the pronoun "*{ex["span2_text"]}*" refer to "*{ex["span1_text"]}*"?\n'
            "Answer:")


def wsc_record(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A release-format record (``target`` holds the spans) flattened and fixed as ``wsc.fixed``."""
    require(row, ("text", "target", "label"), where)
    try:
        flat = {"text": row["text"], **{k: row["target"][k] for k in
                                        ("span1_index", "span1_text", "span2_index", "span2_text")}}
    except (KeyError, TypeError):
        raise DataError(f"{where}: target must hold span1_index/text and span2_index/text") from None
    flat["label"] = int(parse_bool(row["label"], where))
    flat["idx"] = row.get("idx")
    return fix_wsc_spans(flat)


@register_task
class Wsc(MultipleChoiceTask):
    name = "wsc"
    files = ("superglue/WSC/val.jsonl",)
    description = "SuperGLUE WSC validation: does the pronoun refer to the noun?"
    metric_names = ("acc",)
    source = "SuperGLUE WSC validation, 104 items (superglue/WSC/val.jsonl, wsc.fixed span corrections)"
    prompt_version = "lm-eval 0.4.13 wsc v1.0 (wsc.fixed): starred pronoun passage + yes/no question"

    def lm_eval_binding(self) -> LmEvalBinding:
        return LmEvalBinding("super_glue/wsc/default.yaml", "validation", self.lm_eval_records)

    def lm_eval_records(self, options: EvalOptions) -> Records:
        path, rows = _rows(self, options, "WSC")
        return {"validation": [wsc_record(r, f"{path} record {i}") for i, r in enumerate(rows)]}

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        path, rows = _rows(self, options, "WSC")
        docs = []
        for i, row in enumerate(rows):
            ex = wsc_record(row, f"{path} record {i}")
            docs.append(MCDoc(i, wsc_text(ex), ["no", "yes"], ex["label"], meta={"idx": ex["idx"]}))
        return docs
