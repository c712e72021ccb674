"""MMLU (57 subjects, test split), as lm-eval 0.4.13's ``mmlu`` group and its ``mmlu_<subject>`` tasks.

Prompt: the subject line ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``,
then for ``--shots k`` the first k dev questions each followed by ``" {letter}\\n\\n"``, then the question
``"{question}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:"``; choices ``" A"`` … ``" D"``; metric ``acc``.

Groups aggregate as lm-eval's do: the four categories (STEM, humanities, social sciences, other) average
their subjects weighted by size, and ``mmlu`` averages the categories weighted by size (so the overall
accuracy is the mean over all questions); standard errors are pooled the same way. ``--limit`` and
``--sample`` apply to each subject, as lm-eval's ``--limit`` does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rankwise.errors import DataError
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, Records, register_task
from rankwise.evaluation.results import TaskResult, pooled_stderr
from rankwise.evaluation.tasks.datafiles import read_csv, require
from rankwise.evaluation.tasks.multiple_choice import (
    MCDoc,
    MultipleChoiceTask,
    acc_metrics,
    sample_record,
    score_docs,
    scoring_strategy,
    strategy_protocol,
    summarize,
)

#: Subject -> lm-eval category (from lm-eval's mmlu/default task files).
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
#: lm-eval's order of the categories inside the ``mmlu`` group.
CATEGORIES = ("stem", "other", "social_sciences", "humanities")
LETTERS = ("A", "B", "C", "D")
_PROMPT = "lm-eval 0.4.13 mmlu v1.0 (group v2): subject line + k dev shots + question, A.-D. lines, 'Answer:' + ' X'"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(row: dict[str, Any]) -> str:
    """lm-eval's ``doc_to_text`` for MMLU."""
    c = row["choices"]
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def load_rows(path) -> list[dict[str, Any]]:
    """CSV rows (``question,choice0..choice3,answer``) in lm-eval's layout: question, choices, answer."""
    out = []
    for i, row in enumerate(read_csv(path)):
        where = f"{path} row {i + 2}"
        require(row, ("question", "choice0", "choice1", "choice2", "choice3", "answer"), where)
        answer = row["answer"].strip()
        if answer in LETTERS:
            answer = str(LETTERS.index(answer))
        if answer not in ("0", "1", "2", "3"):
            raise DataError(f"{where}: answer must be 0-3, got {row['answer']!r}")
        out.append({"question": row["question"], "choices": [row[f"choice{k}"] for k in range(4)],
                    "answer": int(answer)})
    return out


def lm_eval_records(options: EvalOptions, subject: str) -> Records:
    """cais/mmlu's layout (question, subject, choices, answer) for the test split and the dev shots."""
    out = {}
    for split in ("test", "dev"):
        rows = load_rows(MultipleChoiceTask.data_path(options, f"mmlu/{split}/{subject}_{split}.csv"))
        out[split] = [{"question": r["question"], "subject": subject, "choices": r["choices"],
                       "answer": r["answer"]} for r in rows]
    return out


def subject_docs(options: EvalOptions, subject: str, shots: int) -> list[MCDoc]:
    rows = load_rows(MultipleChoiceTask.data_path(options, f"mmlu/test/{subject}_test.csv"))
    prefix = description(subject)
    if shots:
        dev = load_rows(MultipleChoiceTask.data_path(options, f"mmlu/dev/{subject}_dev.csv"))
        if len(dev) < shots:
            raise DataError(f"mmlu/dev/{subject}_dev.csv has {len(dev)} questions, fewer than --shots {shots}")
        prefix += "".join(f"{question_text(d)} {LETTERS[d['answer']]}\n\n" for d in dev[:shots])
    return [MCDoc(i, prefix + question_text(r), list(LETTERS), r["answer"], meta={"subject": subject})
            for i, r in enumerate(rows)]


def aggregate(name: str, parts: list[TaskResult], protocol: dict[str, Any]) -> TaskResult:
    """A size-weighted mean of the parts' ``acc`` with lm-eval's pooled standard error."""
    sizes = [p.n for p in parts]
    total = sum(sizes)
    acc = sum(p.metrics["acc"] * p.n for p in parts) / total if total else float("nan")
    se = pooled_stderr([p.stderr["acc"] for p in parts], sizes)
    return TaskResult(task=name, metrics={"acc": acc}, stderr={"acc": se}, n=total, protocol=protocol,
                      subtasks=parts)


class _MMLU(MultipleChoiceTask):
    metric_names = ("acc",)
    max_shots = 5
    subjects: ClassVar[tuple[str, ...]] = ()
    group: ClassVar[str | None] = None  # None: one subject; "mmlu" or a category: aggregated

    def required_files(self) -> tuple[str, ...]:
        return tuple(f"mmlu/test/{s}_test.csv" for s in self.subjects)

    def lm_eval_binding(self) -> LmEvalBinding | None:
        if self.group is not None:
            return None
        subject = self.subjects[0]
        return LmEvalBinding(f"mmlu/default/mmlu_{subject}.yaml", "test",
                             lambda options: lm_eval_records(options, subject))

    def lm_eval_members(self) -> tuple[str, ...]:
        """lm-eval's MMLU groups: ``mmlu`` over the four categories, a category over its subjects."""
        if self.group == "mmlu":
            return tuple(f"mmlu_{c}" for c in CATEGORIES)
        if self.group is not None:
            return tuple(f"mmlu_{s}" for s in self.subjects)
        return ()

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        shots = self.resolve_shots(options)
        if options.pooled and options.sample is not None and self.group is not None:
            return self._evaluate_pooled(model, tokenizer, options, shots)
        chosen: list[MCDoc] = []
        subsets = {}
        for subject in self.subjects:
            docs = subject_docs(options, subject, shots)
            subsets[subject] = self.subset(len(docs), options)
            chosen += [docs[i] for i in subsets[subject].indices]
        scored = score_docs(model, tokenizer, chosen, options, self.name)
        per_subject: dict[str, TaskResult] = {}
        for subject in self.subjects:
            mine = [s for s in scored if s.doc.meta["subject"] == subject]
            per_doc = [acc_metrics(s) for s in mine]
            samples = [sample_record(s, m, options.log_samples) for s, m in zip(mine, per_doc, strict=True)]
            proto = self.protocol(shots, subsets[subject], scoring_strategy(model, tokenizer, options)) | {
                "source": f"MMLU {subject} test (mmlu/test/{subject}_test.csv)"}
            per_subject[subject] = summarize(f"mmlu_{subject}", per_doc, self.metric_names, proto, samples)
        return self._combine(per_subject, shots, options, scoring_strategy(model, tokenizer, options))

    def _evaluate_pooled(self, model: Any, tokenizer: Any, options: EvalOptions, shots: int) -> TaskResult:
        """``--sample N`` over all subjects' questions pooled: a uniform sample of the group's questions.

        lm-eval's group accuracy weights subjects and categories by size, which is the plain mean over all
        questions; the plain mean of a uniform sample estimates it without bias, and its standard error is
        the sample's own (per-subject stderrs do not exist for subjects with one or no item).
        """
        docs = [d for subject in self.subjects for d in subject_docs(options, subject, shots)]
        subset = self.subset(len(docs), options)
        scored = score_docs(model, tokenizer, [docs[i] for i in subset.indices], options, self.name)
        per_doc = [acc_metrics(s) for s in scored]
        samples = [sample_record(s, m, options.log_samples) for s, m in zip(scored, per_doc, strict=True)]
        strategy = scoring_strategy(model, tokenizer, options)
        proto = self.protocol(shots, subset, strategy) | {
            "subset": f"{subset.description} questions pooled over {len(self.subjects)} subjects (pooled sample)",
            "source": "MMLU test (mmlu/test/*.csv), few-shot from mmlu/dev",
            "metrics": {"acc": "plain mean over a uniform sample of all questions (estimates lm-eval's "
                               "size-weighted group accuracy); stderr of that sample"}}
        return summarize(self.name, per_doc, self.metric_names, proto, samples)

    def _combine(self, per_subject: dict[str, TaskResult], shots: int, options: EvalOptions,
                 strategy: Any) -> TaskResult:
        if self.group is None:
            return per_subject[self.subjects[0]]
        if options.limit is not None:
            subset = f"first {options.limit} (--limit)"
        elif options.sample is not None:
            subset = f"random {options.sample} (--sample {options.sample} --seed {options.seed})"
        else:
            subset = "all"
        proto = {
            "shots": shots,
            "subset": f"{len(self.subjects)} subjects; per subject: {subset}",
            "source": "MMLU test (mmlu/test/*.csv), few-shot from mmlu/dev",
            "prompt": _PROMPT,
            "metrics": {"acc": "accuracy over all questions: subjects and categories averaged weighted by size "
                               "(lm-eval weight_by_size); stderr pooled as lm-eval"},
            **strategy_protocol(strategy),
        }
        if self.group != "mmlu":
            return aggregate(self.name, [per_subject[s] for s in self.subjects], proto)
        categories = []
        for cat in CATEGORIES:
            parts = [per_subject[s] for s in self.subjects if SUBJECTS[s] == cat]
            categories.append(aggregate(f"mmlu_{cat}", parts, proto | {"subset": f"{len(parts)} subjects"}))
        return aggregate(self.name, categories, proto)


def _define(name: str, subjects: tuple[str, ...], group: str | None, desc: str) -> None:
    cls = type(f"MMLU_{name}", (_MMLU,), {
        "name": name, "subjects": subjects, "group": group, "description": desc,
        "source": f"MMLU test ({', '.join(subjects) if len(subjects) < 3 else f'{len(subjects)} subjects'})",
        "prompt_version": _PROMPT,
    })
    register_task(cls)


_define("mmlu", tuple(SUBJECTS), "mmlu", "MMLU, 57 subjects, 4 choices (all subjects; per-subject results too)")
for _cat in CATEGORIES:
    _define(f"mmlu_{_cat}", tuple(s for s, c in SUBJECTS.items() if c == _cat), _cat, f"MMLU {_cat} subjects")
for _subject in SUBJECTS:
    _define(f"mmlu_{_subject}", (_subject,), None, f"MMLU {_subject.replace('_', ' ')}")
