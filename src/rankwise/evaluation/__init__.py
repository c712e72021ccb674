"""Evaluation, in two parts.

The scoring API (what studies and benches call on any model): :mod:`~rankwise.evaluation.engine`
(lm-eval-identical log-likelihoods, packed / shared-context / full), :mod:`~rankwise.evaluation.perplexity`
(token and rolling windows), :mod:`~rankwise.evaluation.generation` (greedy generation) and
:mod:`~rankwise.evaluation.embeddings`; and the running of named tasks: :mod:`~rankwise.evaluation.registry`
(``EvalOptions``, ``get_task``, ``task_names``), :mod:`~rankwise.evaluation.runner` (``evaluate``),
:mod:`~rankwise.evaluation.results`, :mod:`~rankwise.evaluation.sampling`, :mod:`~rankwise.evaluation.progress`
and :mod:`~rankwise.evaluation.harness` (the same tasks through lm-eval).

:mod:`rankwise.evaluation.tasks` holds the benchmarks: each module reads its own data, builds its prompts
and declares its lm-eval binding; ``tasks.multiple_choice`` is the multiple-choice task family and
``tasks.datafiles`` the file readers they share.
"""
