"""Moved to :mod:`rankwise.evaluation.tasks.multiple_choice` (the multiple-choice task family lives with the
tasks); this module re-exports it for code written against the first release."""

from rankwise.evaluation.tasks.multiple_choice import (
    ENGINE_NOTE,
    METRIC_DEFINITIONS,
    MCDoc,
    MultipleChoiceTask,
    ScoredDoc,
    acc_metrics,
    argmax,
    mc2_metric,
    requests_for,
    sample_record,
    score_docs,
    score_requests,
    scoring_strategy,
    strategy_protocol,
    summarize,
)

__all__ = ["ENGINE_NOTE", "METRIC_DEFINITIONS", "MCDoc", "MultipleChoiceTask", "ScoredDoc", "acc_metrics", "argmax",
           "mc2_metric", "requests_for", "sample_record", "score_docs", "score_requests", "scoring_strategy",
           "strategy_protocol", "summarize"]
