"""The tracking store: which one (URI), whether it can work, a client for it, experiments."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from service.settings import DEFAULT_TRACKING_URI

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# MLflow 3's UI opens an experiment on its GenAI overview unless told it holds training runs.
TAG_KIND, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use, with relative SQLite paths made absolute.

    Ray workers do not share the driver's working directory, so `sqlite:///mlflow.db` must name
    the driver's file explicitly before it is handed to them.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


class TrackingStoreError(ValueError):
    """A tracking URI that cannot work: said before any run exists."""


def check_store(
    uri: str, timeout_s: float = 10.0, *, reach: bool = True, must_exist: bool = False
) -> None:
    """Fail fast, with the reason, when `uri` cannot work as a tracking store.

    Only at the start of a command: later, a store that goes away is waited for (the metric
    logger retries and keeps its buffer), but MLflow's own client would retry an address where no
    server ever answered for minutes, and show a file store's or a missing driver's error as a
    traceback. `must_exist`: the command reads runs (`evaluate`, `--from-run`), so a SQLite file
    that is not there is a wrong path, not a store to create.
    """
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    scheme = parsed.scheme
    # What the messages show: never a password, into a terminal or a log.
    shown = uri.replace(f":{parsed.password}@", ":***@", 1) if parsed.password else uri
    if scheme in ("", "file"):
        raise TrackingStoreError(
            f"{shown!r} is MLflow's file store, which MLflow 3 no longer accepts; use "
            "sqlite:///mlflow.db or an MLflow server, http://HOST:5000"
        )
    if not reach:  # the form only: a long-lived service waits for its store to come up
        return
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:  # one request, no retries; any HTTP answer (even 401/404) means a server is there
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingStoreError(f"no MLflow server answers at {shown} ({reason})") from None
        return
    if scheme == "sqlite":
        check_sqlite_store(Path(uri.removeprefix("sqlite:///")), shown, must_exist, timeout_s)
        return
    try:
        client_for(uri).search_experiments(max_results=1)
    except ImportError as e:
        raise TrackingStoreError(f"{shown}: its database driver is missing ({e})") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if parsed.password:
            first = first.replace(parsed.password, "***")
        raise TrackingStoreError(f"cannot open the tracking store {shown}: {first}") from None


def check_sqlite_store(path: Path, shown: str, must_exist: bool, timeout_s: float) -> None:
    """A SQLite store can work if its file does not exist yet (MLflow creates it on first use),
    or is a SQLite database that is empty or holds MLflow's tables. Read with the standard
    library: MLflow opens it later, when the launch needs it."""
    if not path.exists():
        if must_exist:
            raise TrackingStoreError(f"no tracking store at {shown}: the file does not exist")
        return  # created on first use (not before the spec is known to be valid)
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s)
        ) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.Error as e:
        raise TrackingStoreError(f"cannot open the tracking store {shown}: {e}") from None
    tables = {name for (name,) in rows}
    if tables and "experiments" not in tables:
        raise TrackingStoreError(
            f"cannot open the tracking store {shown}: a SQLite database, but not MLflow's"
        )


_opened: set[str] = set()  # SQLite stores this process has opened (complete from then on)


def client_for(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    # MLflow draws a progress bar on stderr for each artifact it downloads (a run's spec, a
    # checkpoint to resume from): noise in a driver's log, and in an error that must be a line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    if not uri.startswith("sqlite:///") or uri in _opened:
        return MlflowClient(tracking_uri=uri)
    # MLflow creates (or upgrades) a SQLite store's tables when it first opens it; two processes
    # doing so at once (two `rlgen run` on a new store) both migrate and one crashes ("table
    # latest_metrics already exists"). One process at a time opens it, the first time.
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
    _opened.add(uri)
    return client


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"rlgen.store-{digest}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of the experiment `name`, created (or restored) as needed.

    For a local SQLite store the artifacts go beside the database, in `mlartifacts/`.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if TAG_KIND not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, TAG_KIND, KIND_TRAINING)
        return str(exp.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):
        root = Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts"
        location = root.as_uri()
    try:
        return str(
            client.create_experiment(
                name, artifact_location=location, tags={TAG_KIND: KIND_TRAINING}
            )
        )
    except MlflowException:  # created concurrently by another launch
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)
