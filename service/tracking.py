"""MLflow tracking: how a trial's records reach MLflow, experiments, and run bookkeeping.

Algorithms never call MLflow: they log through the run context (`runctx`), whose `MetricLogger`
buffers points and hands batches to a writer on a background thread. There is one path per
deployment:

    embedded (`rlgen run`, local Ray: the driver and its trials share one machine)
        trial: ctx.log_metrics -> MetricLogger -> RunWriter -> RelayTracker ==unix socket==>
        driver: Relay -> Tracker -> MlflowWriter.log_batch -> sqlite:///mlflow.db (or a server)

    cluster (`--address`, a Ray Job; trials on any node)
        trial: ctx.log_metrics -> MetricLogger -> RunWriter -> Tracker -> MlflowWriter.log_batch
               -> http://MLFLOW:5000

On the embedded cluster the driver, which has MLflow loaded already, is the store's only writer
(`service.relay`): trials never import MLflow, and SQLite never sees two writers at once. On a
cluster every trial talks to the tracking server itself.

Failures: `with_retries` retries what may pass (a lost connection, a 5xx answer, SQLite busy)
with backoff, and the metric logger keeps a batch that still failed in its buffer for the next
attempt, so a restart of the tracking server loses nothing. A permanent rejection (a 4xx answer,
an invalid value) is not retried: the writer raises `runctx.RejectedError` naming the metrics.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from runctx import MetricPoint, RejectedError, name_problem

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
TAG_CONTINUED_FROM = "rlgen.continued_from"  # the trial run a continued trial goes on from
TAG_INIT_FROM = "rlgen.init_from"  # the run whose weights a trial started from
TAG_EXPLOITS = "rlgen.pbt.exploits"  # a PBT member's exploits: step, donor, new values
# The most runs one MLflow search returns (its own limit): a launch has at most
# `spec.MAX_TRIALS` trials and a parent, so one page holds them all.
SEARCH_MAX = 50_000
TAG_PARENT = "mlflow.parentRunId"
ACTIVE = ("RUNNING", "SCHEDULED")


def is_transient(error: BaseException) -> bool:
    """Whether a failed tracking call may pass if tried again: a lost connection, a 5xx (or
    429) answer, a busy SQLite file. A 4xx answer, an invalid value, will fail every time."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, OSError | TimeoutError):  # ConnectionError, requests' errors
        return True
    if isinstance(error, MlflowException):
        # MLflow reports an unreachable server as INTERNAL_ERROR (500), a locked SQLite file
        # as TEMPORARILY_UNAVAILABLE (503), a refused value as INVALID_PARAMETER_VALUE (400).
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return bool(getattr(error, "transient", False))  # `service.relay.RelayError`


def with_retries(
    fn: Callable[[], T], what: str, *, attempts: int = 6, first_wait_s: float = 0.5
) -> T:
    """Call `fn`, retrying transient failures (`is_transient`) with exponential backoff (0.5 s,
    1 s, 2 s, ...); anything else is raised at once."""
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            log.warning(
                "%s failed (%s); retry %d/%d in %.1f s", what, e, attempt, attempts - 1, wait
            )
            time.sleep(wait)
            wait = min(wait * 2, 30.0)
    raise AssertionError("unreachable")


class MlflowWriter:
    """`runctx.Writer` for one MLflow run."""

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

            try:
                with_retries(write, "log_batch")
            except Exception as e:
                if is_transient(e):
                    raise
                keys = ", ".join(sorted({m.key for m in chunk}))
                raise RejectedError(f"MLflow refused metrics {keys}: {e}") from None

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
    in-process or, on the embedded cluster, of the driver (`service.relay`). Every call retries
    transient failures with backoff (`with_retries`)."""

    # What the relay serves: a closed table, like the algorithm registry.
    REMOTE = frozenset(
        {
            "find_run", "create_run", "set_tag", "log_params", "resume", "fetch_checkpoint",
            "write_metrics", "write_artifact", "write_image", "set_terminated",
        }
    )  # fmt: skip

    def __init__(self, client: MlflowClient):
        self.client = client

    def find_run(
        self, experiment_id: str, launch_id: str, label: str
    ) -> tuple[str, dict[str, str]] | None:
        """Id and tags of the run of this launch and trial, if it exists already.

        Launch ids are unique, so this only finds something when a trial runs again: Ray
        restarted it after its worker died (`max_failures`; its run was left RUNNING), or PBT
        resumes a trial it paused (its run ended KILLED when the worker was stopped). The trial
        then continues that run (`resume` marks it RUNNING again) instead of starting another."""
        runs = with_retries(
            lambda: self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{TAG_LAUNCH}` = '{launch_id}'",
                max_results=SEARCH_MAX,
            ),
            "search runs",
        )
        for run in runs:
            if run.data.tags.get(TAG_TRIAL) == label:
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
        with_retries(lambda: client.update_run(run_id, status="RUNNING"), "reopen run")
        found = self.fetch_checkpoint(run_id, str(Path(workdir) / "checkpoints"))
        if found is not None:
            log.info("run %s continues from %s", run_id, found)
            self.set_tag(run_id, "rlgen.resumed_from", found)
        metrics = with_retries(lambda: client.get_run(run_id), "get_run").data.metrics
        return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in metrics}

    def fetch_checkpoint(self, run_id: str, directory: str) -> str | None:
        """Download the run's newest checkpoint into `directory`; its artifact path (such as
        `checkpoints/step_0000001000.pt`), or None when the run has none."""
        client = self.client
        checkpoints = [
            f.path
            for f in with_retries(lambda: client.list_artifacts(run_id, "checkpoints"), "list")
            if f.path.endswith(".pt")
        ]
        if not checkpoints:
            return None
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            local = Path(
                with_retries(
                    lambda: client.download_artifacts(run_id, max(checkpoints), tmp),
                    "checkpoint download",
                )
            )
            local.replace(target / local.name)
        return max(checkpoints)

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
    """`runctx.Writer` for one run, through a tracker (in-process, or the driver's relay)."""

    def __init__(self, tracker: Any, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def write_metrics(self, points: Sequence[MetricPoint]) -> None:
        try:
            self.tracker.write_metrics(self.run_id, [tuple(p) for p in points])
        except RejectedError:
            raise
        except Exception as e:  # from the relay: permanent failures come back as RelayError
            if is_transient(e):
                raise
            raise RejectedError(str(e)) from None

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        self.tracker.write_artifact(self.run_id, str(local_path), artifact_dir)

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        self.tracker.write_image(self.run_id, str(local_path), key, step)

    def close(self) -> None:
        pass


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI at `ui`, in its model-training view: an experiment opens in
    the GenAI view unless the link says otherwise, and the UI remembers the choice."""
    return (
        f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        "?workflowType=machine_learning"
    )


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
        name = re.sub(r"[^\w.\- :]", "_", key)[:250] if name_problem(key) else key
        params.setdefault(name, value[:6000])
    return [Param(k, v) for k, v in params.items()]
