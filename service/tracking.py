"""MLflow tracking: the writer behind `RunContext`, experiments, and run bookkeeping.

Algorithms never call MLflow: they log through the run context, whose buffered `MetricLogger`
hands batches to `MlflowWriter`, which writes them with `log_batch` (~0.1 ms a metric against
SQLite, where `log_metric` costs ~5 ms a call) and retries with backoff when the store is busy or
unreachable, so that a restart of the tracking server loses nothing. `Tracker` is everything else
a trial asks of MLflow (its run, params, checkpoints to resume from), in plain data, so that the
driver can serve it to the embedded cluster's workers (`service.relay`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from service.points import MetricPoint
from service.settings import DEFAULT_TRACKING_URI

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call
TAG_LAUNCH = "rlgen.launch_id"
TAG_SEED = "rlgen.seed"
TAG_TRIAL = "rlgen.trial"  # the trial's label: seed and swept values, "s0 learning_rate=0.001"
TAG_STOPPED_EARLY = "rlgen.stopped_early"  # set on trials a scheduler stopped
TAG_RESTARTS = "rlgen.restarts"  # times a trial's worker died and Tune restarted it
TAG_WORKER = "rlgen.worker"  # host:pid of the process running the trial (a restart updates it)
TAG_ERROR = "rlgen.error"
# The most runs one MLflow search returns (its own limit): a launch has at most
# `spec.MAX_TRIALS` trials and a parent, so one page holds them all.
SEARCH_MAX = 50_000
TAG_PARENT = "mlflow.parentRunId"
ACTIVE = ("RUNNING", "SCHEDULED")
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
    if scheme == "sqlite" and not Path(uri.removeprefix("sqlite:///")).exists():
        if must_exist:
            raise TrackingStoreError(f"no tracking store at {shown}: the file does not exist")
        return  # created on first use (not before the spec is known to be valid)
    try:
        client_for(uri).search_experiments(max_results=1)
    except ImportError as e:
        raise TrackingStoreError(f"{shown}: its database driver is missing ({e})") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if parsed.password:
            first = first.replace(parsed.password, "***")
        raise TrackingStoreError(f"cannot open the tracking store {shown}: {first}") from None


_opened: set[str] = set()  # SQLite stores this process has opened (complete from then on)


def client_for(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

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


def with_retries(
    fn: Callable[[], T], what: str, *, attempts: int = 6, first_wait_s: float = 0.5
) -> T:
    """Call `fn`, retrying with exponential backoff (0.5 s, 1 s, 2 s, ...) on any error."""
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # sqlite "database is locked", HTTP errors, connection resets
            if attempt == attempts:
                raise
            log.warning(
                "%s failed (%s); retry %d/%d in %.1f s", what, e, attempt, attempts - 1, wait
            )
            time.sleep(wait)
            wait = min(wait * 2, 30.0)
    raise AssertionError("unreachable")


class MlflowWriter:
    """`service.context.Writer` for one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def write_metrics(self, points: Sequence[MetricPoint]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points]
        for i in range(0, len(metrics), BATCH_LIMIT):
            chunk = metrics[i : i + BATCH_LIMIT]

            def write(chunk: list[Metric] = chunk) -> None:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

            with_retries(write, "log_batch")

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        with_retries(
            lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_dir or None),
            f"upload of {local_path.name}",
        )

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(local_path) as im:
            pixels = np.asarray(im.convert("RGB"))
        with_retries(
            lambda: self.client.log_image(
                self.run_id, pixels, key=key, step=step, synchronous=True
            ),
            f"image {key} step {step}",
        )


class Tracker:
    """What a trial asks of MLflow, in plain data (ids, dicts, paths), so that it can be asked
    in-process or, on the embedded cluster, of the driver (`service.relay`): the driver has
    MLflow loaded already, and workers that never import it start ~1.3 s sooner. Every call
    retries with backoff (`with_retries`)."""

    # What the relay serves: a closed table, like the algorithm registry.
    REMOTE = frozenset(
        {
            "find_run", "create_run", "set_tag", "log_params", "resume", "write_metrics",
            "write_artifact", "write_image", "set_terminated",
        }
    )  # fmt: skip

    def __init__(self, client: MlflowClient):
        self.client = client

    def find_run(
        self, experiment_id: str, launch_id: str, label: str
    ) -> tuple[str, dict[str, str]] | None:
        """Id and tags of the run of this launch and trial that a dead worker left RUNNING.

        Launch ids are unique, so this only finds something when Ray restarts a trial whose
        worker died (`max_failures`); the trial then continues that run instead of another."""
        runs = with_retries(
            lambda: self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{TAG_LAUNCH}` = '{launch_id}'",
                max_results=SEARCH_MAX,
            ),
            "search runs",
        )
        for run in runs:
            if run.data.tags.get(TAG_TRIAL) == label and run.info.status in ACTIVE:
                return run.info.run_id, dict(run.data.tags)
        return None

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str) -> str:
        run = with_retries(
            lambda: self.client.create_run(experiment_id, tags=tags, run_name=run_name),
            "create_run",
        )
        return str(run.info.run_id)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        with_retries(lambda: self.client.set_tag(run_id, key, value), f"tag {key}")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        batch = params_batch(params)
        with_retries(
            lambda: self.client.log_batch(run_id, params=batch, synchronous=True), "log params"
        )

    def resume(self, run_id: str, workdir: str) -> dict[str, int]:
        """Put the run's newest checkpoint where the algorithm looks for it (`workdir`'s
        `checkpoints/`); return, per metric, the last step already logged, so that the steps the
        algorithm replays are not logged twice."""
        client = self.client
        checkpoints = [
            f.path
            for f in with_retries(lambda: client.list_artifacts(run_id, "checkpoints"), "list")
            if f.path.endswith(".pt")
        ]
        if checkpoints:
            target = Path(workdir) / "checkpoints"
            target.mkdir(parents=True, exist_ok=True)
            local = Path(
                with_retries(
                    lambda: client.download_artifacts(run_id, max(checkpoints), workdir),
                    "checkpoint download",
                )
            )
            local.replace(target / local.name)
            log.info("run %s continues from %s", run_id, max(checkpoints))
            self.set_tag(run_id, "rlgen.resumed_from", max(checkpoints))
        metrics = with_retries(lambda: client.get_run(run_id), "get_run").data.metrics
        return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in metrics}

    def write_metrics(self, run_id: str, points: Sequence[tuple[Any, ...]]) -> None:
        MlflowWriter(self.client, run_id).write_metrics([MetricPoint(*p) for p in points])

    def write_artifact(self, run_id: str, local_path: str, artifact_dir: str) -> None:
        MlflowWriter(self.client, run_id).write_artifact(Path(local_path), artifact_dir)

    def write_image(self, run_id: str, local_path: str, key: str, step: int) -> None:
        MlflowWriter(self.client, run_id).write_image(Path(local_path), key, step)

    def set_terminated(self, run_id: str, status: str) -> None:
        with_retries(lambda: self.client.set_terminated(run_id, status), "set_terminated")

    def close(self) -> None:
        pass  # the client holds nothing to release (the relay's tracker holds a socket)


class RunWriter:
    """`service.context.Writer` for one run, through any tracker (in-process or relayed)."""

    def __init__(self, tracker: Any, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def write_metrics(self, points: Sequence[MetricPoint]) -> None:
        self.tracker.write_metrics(self.run_id, [tuple(p) for p in points])

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        self.tracker.write_artifact(self.run_id, str(local_path), artifact_dir)

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        self.tracker.write_image(self.run_id, str(local_path), key, step)

    def close(self) -> None:
        pass


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


def runs_of_launch(client: MlflowClient, experiment_id: str, launch_id: str) -> list[Run]:
    """Trial runs of one launch (the parent excluded), in seed order."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_LAUNCH}` = '{launch_id}'",
        max_results=SEARCH_MAX,
    )
    trials = [r for r in runs if TAG_SEED in r.data.tags]
    return sorted(trials, key=lambda r: int(r.data.tags[TAG_SEED]))


def close_dangling(client: MlflowClient, runs: Sequence[Run], status: str, reason: str) -> int:
    """End runs a dead or interrupted worker left RUNNING, so none stays RUNNING forever.
    Returns how many it ended."""
    closed = 0
    for run in runs:
        if run.info.status in ACTIVE:
            client.set_tag(run.info.run_id, TAG_ERROR, reason[:5000])
            client.set_terminated(run.info.run_id, status)
            closed += 1
    return closed


def git_commit(*dirs: Path) -> str | None:
    for d in dirs:
        try:
            out = subprocess.run(
                ["git", "-C", str(d), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def params_batch(flat: dict[str, str]) -> list[Any]:
    """MLflow params of a flattened spec. Keys from free-form mappings (`env.kwargs`,
    `driver.resources`) may hold what MLflow refuses in a name: those characters become `_`."""
    from mlflow.entities import Param

    params: dict[str, str] = {}
    for key, value in flat.items():
        name = re.sub(r"[^\w.\- :]", "_", key)[:250] if mlflow_name_problem(key) else key
        params.setdefault(name, value[:6000])
    return [Param(k, v) for k, v in params.items()]


def mlflow_name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as a tag, param or metric name (None: it would not):
    letters, digits, _ - . space : /, at most 250 characters, and a path that does not
    normalise to another name ("a//b", "../x")."""
    if not name:
        return "empty"
    if len(name) > 250:
        return "longer than MLflow's 250 characters"
    if not re.fullmatch(r"[/\w.\- :]+", name):
        return "MLflow names hold only letters, digits, _ - . space : and /"
    if posixpath.normpath(name) != name or name.startswith(".."):
        return f"reads as the path {posixpath.normpath(name)!r} in MLflow"
    return None
