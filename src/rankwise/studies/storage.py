"""Where studies live: Optuna RDB storage (SQLite on one machine, PostgreSQL across machines), and the
few state changes that must be atomic across processes.

Why some transitions bypass Optuna's own calls: Optuna checks a trial's state and then writes it in two
statements. PostgreSQL's ``SELECT ... FOR UPDATE`` makes that safe; SQLite (through Python's sqlite3,
which opens the write transaction only at the UPDATE) does not, so two workers can both pop the same
waiting trial, or both fail the same stale trial and both queue a retry: a point run twice. Here claiming
a trial (WAITING -> RUNNING) and failing a stale one (RUNNING -> FAIL) are single conditional UPDATEs
(``... WHERE state = <expected>``) whose row count says who won, which is atomic on every database.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
import warnings
from typing import Any

from rankwise.errors import RankwiseError, first_line

SQLITE_TIMEOUT_S = 60
PG_CONNECT_TIMEOUT_S = 10
OPEN_ATTEMPTS = 5
_RACE_MARKERS = ("already exists", "locked", "UNIQUE constraint", "duplicate key")
_OPEN: dict[tuple[str, int | None, int | None], Any] = {}
_OPEN_LOCK = threading.Lock()


def driver_url(url: str) -> str:
    """SQLAlchemy URL with an installed driver: ``postgresql://`` means psycopg 3 here (psycopg2 is not a
    dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            try:
                import psycopg2  # noqa: F401

                return "postgresql+psycopg2://" + url[len(prefix):]
            except ImportError:
                return "postgresql+psycopg://" + url[len(prefix):]
    return url


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url`` (busy timeout for SQLite, connect timeout for
    PostgreSQL), or a one-line error naming the URL when it cannot be opened."""
    key = (url, heartbeat_interval, grace_period)
    with _OPEN_LOCK:  # one storage (engine, connection pool) per URL and settings in a process
        if key not in _OPEN:
            _OPEN[key] = _open(url, heartbeat_interval, grace_period)
        return _OPEN[key]


def _open(url: str, heartbeat_interval: int | None, grace_period: int | None) -> Any:
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise RankwiseError(f"storage {url!r}: not a database URL (e.g. sqlite:///study.db or "
                            "postgresql://user@host/db)")
    real = driver_url(url)
    if real.startswith("sqlite"):
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    elif real.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    else:
        engine_kwargs = {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats are "experimental" in Optuna 5 (a warning per storage); rankwise pins the version it tests.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(real, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        except Exception as exc:  # driver missing, connection refused, unwritable file, bad URL ...
            text = str(exc)
            # Two processes opening a fresh database race to create Optuna's tables; the loser retries.
            if attempt + 1 < OPEN_ATTEMPTS and any(m in text for m in _RACE_MARKERS):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise RankwiseError(f"storage {url}: cannot open ({first_line(exc)})") from None
    raise AssertionError("unreachable")  # pragma: no cover


def study_names(storage: Any) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def resolve_name(storage: Any, url: str, name: str | None) -> str:
    """The study to use: ``name`` if it exists, else the only study in the storage; one-line errors otherwise."""
    names = study_names(storage)
    if name is not None:
        if name not in names:
            known = f" (studies there: {', '.join(names)})" if names else " (it holds no studies)"
            raise RankwiseError(f"no study named '{name}' in {url}{known}")
        return name
    if len(names) == 1:
        return names[0]
    if not names:
        raise RankwiseError(f"{url} holds no studies")
    raise RankwiseError(f"{url} holds {len(names)} studies ({', '.join(names)}): choose one with --name")


def transition(storage: Any, trial_id: int, src: Any, dst: Any) -> bool:
    """Atomically move a trial from state ``src`` to ``dst``; True if this call did it."""
    from optuna.storages._rdb import models
    from optuna.trial import TrialState
    from sqlalchemy import update

    values: dict[str, Any] = {"state": dst}
    now = _dt.datetime.now()
    if dst == TrialState.RUNNING:
        values["datetime_start"] = now
    if dst.is_finished():
        values["datetime_complete"] = now
    stmt = (update(models.TrialModel)
            .where(models.TrialModel.trial_id == trial_id, models.TrialModel.state == src)
            .values(**values))
    with storage.engine.begin() as conn:
        result = conn.execute(stmt)
    return result.rowcount == 1
