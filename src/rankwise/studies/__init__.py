"""Studies: the paper's design-space sweeps and automatic search, resumable and distributed on Optuna.

* :mod:`.spec` - the study spec (YAML), validated with one-line errors naming the field;
* :mod:`.points` - design points: the paper's sweeps as presets, axes and explicit plans;
* layer removal (the baseline) is :mod:`rankwise.decomposition.removal`, shared with plans;
* :mod:`.trial` - measuring one point on a model loaded once, and restoring it afterwards;
* :mod:`.storage` - Optuna RDB storage (SQLite, PostgreSQL) and atomic trial state changes;
* :mod:`.engine` - creating/resuming studies, workers with heartbeats and retries, :func:`run_study`;
* :mod:`.export` - the results document (``rankwise.study/1``), CSV and status.
"""

from rankwise.studies.engine import run_study, work
from rankwise.studies.export import study_document
from rankwise.studies.spec import StudySpec, load_spec

__all__ = ["StudySpec", "load_spec", "run_study", "study_document", "work"]
