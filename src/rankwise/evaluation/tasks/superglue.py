"""SuperGLUE COPA, RTE and WSC validation sets, as lm-eval 0.4.13's ``copa``, ``sglue_rte`` and ``wsc``.

RTE is registered as ``rte`` (the name most papers use; lm-eval's GLUE ``rte`` has the same prompt, choices
and 277 validation pairs as its SuperGLUE ``sglue_rte``) and also as ``sglue_rte``. WSC follows lm-eval's
``wsc`` task, which reads the ``wsc.fixed`` configuration: :func:`fix_wsc_spans` applies the same span fixes
to the original release file. All three report ``acc`` only, as lm-eval does.

:class:`SuperGlueTask` is what these tasks (and BoolQ) share: one validation JSONL file whose rows are
checked and converted once into the records of lm-eval's dataset, and a document built from each record.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from string import Formatter
from typing import Any, ClassVar

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, register_task
from rankwise.evaluation.tasks.datafiles import read_jsonl, require
from rankwise.evaluation.tasks.multiple_choice import MCDoc, MultipleChoiceTask


def parse_bool(value: object, where: str) -> bool:
    """SuperGLUE labels come as JSON booleans or the strings "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{where}: label must be true or false, got {value!r}")


class SuperGlueTask(MultipleChoiceTask):
    """A validation-split task read from one JSONL file (``files[0]``): each row becomes a record in the
    layout of lm-eval's dataset (:meth:`record`, which also checks it), each record one document (:meth:`doc`)."""

    metric_names = ("acc",)
    #: The prompt: ``str.format`` fields of the record (``"{passage}\nQuestion: {question}?\nAnswer:"``), and
    #: the choices after it; the gold choice is the record's ``label``.
    template: ClassVar[str] = ""
    choices: ClassVar[tuple[str, ...]] = ()
    #: Fields every row must have (checked before :meth:`record`); by default the template's and ``label``.
    fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.template and "fields" not in vars(cls):
            cls.fields = (*(f for _, f, _, _ in Formatter().parse(cls.template) if f), "label")

    def record(self, row: dict[str, Any], where: str) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def context(self, record: dict[str, Any]) -> str:
        return self.template.format(**record)

    def doc(self, record: dict[str, Any], doc_id: int) -> MCDoc:
        return MCDoc(doc_id, self.context(record), list(self.choices), record["label"], meta={"idx": record["idx"]})

    def records(self, options: EvalOptions) -> list[dict[str, Any]]:
        path = self.data_path(options, self.files[0])
        out = []
        for i, row in enumerate(read_jsonl(path)):
            require(row, self.fields, f"{path} record {i}")
            out.append(self.record(row, f"{path} record {i}"))
        return out

    def lm_eval_binding(self) -> LmEvalBinding:
        """lm-eval's ``super_glue/<set>/default.yaml``, the set named by the data file's folder."""
        folder = PurePosixPath(self.files[0]).parent.name.lower()
        return LmEvalBinding(f"super_glue/{folder}/default.yaml", "validation",
                             lambda options: {"validation": self.records(options)})

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:
        return [self.doc(record, i) for i, record in enumerate(self.records(options))]


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
class Copa(SuperGlueTask, name="copa", files=("superglue/COPA/val.jsonl",),
           fields=("premise", "choice1", "choice2", "question", "label"),
           description="SuperGLUE COPA validation: choose the cause or effect",
           source="SuperGLUE COPA validation, 100 items (superglue/COPA/val.jsonl)",
           prompt_version="lm-eval 0.4.13 copa v1.0: premise[:-1] + ' because'/' therefore' + '  ' + choice"):
    def record(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        if row["question"] not in ("cause", "effect") or row["label"] not in (0, 1):
            raise DataError(f"{where}: question must be cause/effect and label 0/1")
        return row

    def doc(self, record: dict[str, Any], doc_id: int) -> MCDoc:
        return copa_doc(record, doc_id)


# ------------------------------------------------------------------------------------------------- RTE


RTE_LABELS = {"entailment": 0, "not_entailment": 1}


@register_task
class Rte(SuperGlueTask, name="rte", files=("superglue/RTE/val.jsonl",), choices=("True", "False"),
          template="{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
          description="RTE (SuperGLUE/GLUE) validation: does the premise entail the hypothesis?",
          source="RTE validation, 277 pairs (superglue/RTE/val.jsonl; same pairs as GLUE RTE dev)",
          prompt_version="lm-eval 0.4.13 sglue_rte v0.0 / rte v1.0: "
                         "'{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:'"):
    def record(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        if row["label"] not in RTE_LABELS:
            raise DataError(f"{where}: label must be entailment or not_entailment")
        return {"premise": row["premise"], "hypothesis": row["hypothesis"], "label": RTE_LABELS[row["label"]],
                "idx": row.get("idx")}


@register_task
class SglueRte(Rte, name="sglue_rte", description="RTE under lm-eval's SuperGLUE name (same task as rte)"):
    """RTE registered under lm-eval's SuperGLUE task name."""


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
class Wsc(SuperGlueTask, name="wsc", files=("superglue/WSC/val.jsonl",), choices=("no", "yes"),
          description="SuperGLUE WSC validation: does the pronoun refer to the noun?",
          source="SuperGLUE WSC validation, 104 items (superglue/WSC/val.jsonl, wsc.fixed span corrections)",
          prompt_version="lm-eval 0.4.13 wsc v1.0 (wsc.fixed): starred pronoun passage + yes/no question"):
    def record(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        return wsc_record(row, where)

    def context(self, record: dict[str, Any]) -> str:
        return wsc_text(record)
