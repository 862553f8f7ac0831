"""Study storage: an Optuna RDB storage (SQLite file by default, PostgreSQL / MySQL for
several workers) with heartbeats and retry of trials whose worker died, plus a short
cross-process lock so that workers sharing a study reserve trials one at a time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Optional

from .errors import ConfigError, StorageError, require_optuna

logger = logging.getLogger(__name__)

DB_NAME = "study.db"
_HAVE_FLOCK = importlib.util.find_spec("fcntl") is not None


def default_storage_url(out: str | Path) -> str:
    """``sqlite:///<out>/study.db`` (absolute, so the URL does not depend on the cwd)."""
    return f"sqlite:///{(Path(out) / DB_NAME).resolve()}"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and outputs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: hide anything after the scheme
        return url.split("://", 1)[0] + "://..." if "@" in url else url


def _password(url: str) -> Optional[str]:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:  # noqa: BLE001
        return None


def _first_line(exc: BaseException, url: str) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    secret = _password(url)
    return text.replace(str(secret), "***") if secret else text


def open_storage(url: str, *, heartbeat_interval: int = 60, grace_period: Optional[int] = None,
                 max_retry: Optional[int] = 3):
    """An ``optuna.storages.RDBStorage`` on ``url`` with a heartbeat every
    ``heartbeat_interval`` s: a RUNNING trial whose worker stopped beating for
    ``grace_period`` s (default twice the interval) is failed and re-queued with the same
    parameters, at most ``max_retry`` times (None: without limit).

    Unreachable servers, missing drivers and malformed URLs raise one :class:`StorageError`
    naming the URL (password masked) and what to do.
    """
    optuna = require_optuna()
    if isinstance(heartbeat_interval, bool) or not isinstance(heartbeat_interval, int) \
            or heartbeat_interval < 1:
        raise ConfigError(f"heartbeat interval must be an integer >= 1 (seconds); "
                          f"got {heartbeat_interval!r}")
    grace = 2 * heartbeat_interval if grace_period is None else grace_period
    if not isinstance(grace, int) or grace <= heartbeat_interval:
        raise ConfigError(f"grace period must be an integer > the heartbeat interval "
                          f"({heartbeat_interval} s); got {grace_period!r}")
    if max_retry is not None and max_retry < 0:
        raise ConfigError(f"max retry must be >= 0; got {max_retry}")
    shown = mask_url(url)
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
        raise StorageError(f"bad storage URL {shown!r}; expected e.g. sqlite:///runs/tune/"
                           f"study.db or postgresql://USER:PASSWORD@HOST:5432/DB") from None
    backend = parsed.get_backend_name()
    kwargs: dict = {}
    if backend == "postgresql":
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        url = _postgres_driver(parsed)
    elif backend == "sqlite":
        kwargs = {"connect_args": {"timeout": 60}}  # several processes may write at once
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # optuna >= 4.9 renamed RetryFailedTrialCallback / failed_trial_callback
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
        or optuna.storages.RetryFailedTrialCallback
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params
                else "failed_trial_callback")
    try:
        return _create(optuna, url, retry_cls, engine_kwargs=kwargs,
                       heartbeat_interval=heartbeat_interval, grace_period=grace,
                       max_retry=max_retry, callback=callback)
    except ImportError as exc:  # the database driver
        extra = " (pip install 'stas[postgres]', i.e. psycopg2-binary)" \
            if backend == "postgresql" else ""
        raise StorageError(f"cannot open study storage {shown}: its database driver is "
                           f"missing ({exc.__cause__ or exc}); install it{extra}") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy errors of every kind
        raise StorageError(
            f"cannot open study storage {shown}: {_first_line(exc, url)}; check that the "
            f"database server runs and is reachable at that address, that the database "
            f"exists and the user may connect (or leave out --storage to use a SQLite file "
            f"in --out)") from None


def _create(optuna, url: str, retry_cls, *, max_retry, callback: str, attempts: int = 6,
            **kwargs):
    """``RDBStorage(url, ...)``; workers starting together on a fresh database race to
    create its tables (a unique-key or duplicate-table error for the loser): try again."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", FutureWarning)
                retry = retry_cls(max_retry=max_retry)
                return optuna.storages.RDBStorage(url, **kwargs, **{callback: retry})
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            raced = not isinstance(exc, OperationalError) or "already exists" in str(exc)
            if not raced or attempt == attempts - 1:
                raise
            logger.debug("storage schema creation raced with another worker; retrying")
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def stale_trial_callback(storage):
    """The storage's re-queue callback for trials of dead workers (None: none set)."""
    for name in ("get_heartbeat_stale_trial_callback", "get_failed_trial_callback"):
        if hasattr(storage, name):
            return getattr(storage, name)()
    return None


def _postgres_driver(parsed) -> str:
    """A ``postgresql://`` URL with the installed driver: SQLAlchemy 2.1 defaults to psycopg
    (3); the ``postgres`` extra installs psycopg2-binary. An explicit driver is kept."""
    url = parsed.render_as_string(hide_password=False)
    if "+" in parsed.drivername or importlib.util.find_spec("psycopg") is not None:
        return url
    if importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


class ReservationLock:
    """A short cross-process lock per study, held while a worker counts the study's trials
    and creates its next one, so that workers never reserve more trials than asked for.

    SQLite: ``flock`` on ``<db>.lock`` beside the database; PostgreSQL: a session advisory
    lock; MySQL: ``GET_LOCK``. All of them are released when the process dies. Other
    backends go without (a few extra trials may then run). Re-entrant release is a no-op.
    """

    def __init__(self, storage, study_name: str) -> None:
        self.engine = storage.engine
        self.backend = self.engine.name
        digest = hashlib.sha1(f"stas-tune:{study_name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self.name = f"stas-tune:{digest.hex()[:40]}"
        self._fd: Optional[int] = None
        self._conn = None
        self.held = False
        self._path: Optional[Path] = None
        if self.backend == "sqlite":
            db = self.engine.url.database
            if db and db != ":memory:" and _HAVE_FLOCK:  # else: one process per file
                self._path = Path(db + ".lock")
        #: whether the lock really excludes other processes
        self.effective = self._path is not None or self.backend in ("postgresql", "mysql")
        if self.backend not in ("sqlite", "postgresql", "mysql"):
            logger.warning("no cross-process lock for %s storage: workers sharing a study may "
                           "run a few trials more than asked for", self.backend)

    def acquire(self) -> None:
        from sqlalchemy import text

        if self.held:
            return
        if self._path is not None:
            import fcntl

            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.backend in ("postgresql", "mysql"):
            self._conn = self.engine.connect()
            if self.backend == "postgresql":
                self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            else:
                self._conn.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": self.name})
            self._commit()
        self.held = True

    def _commit(self) -> None:
        commit = getattr(self._conn, "commit", None)  # SQLAlchemy 1.4 legacy: none needed
        if commit is not None:
            commit()

    def release(self) -> None:
        from sqlalchemy import text

        if not self.held:
            return
        self.held = False
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            try:
                if self.backend == "postgresql":
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                else:
                    self._conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": self.name})
                self._commit()
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "ReservationLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
