"""One trial: an MLflow run around `algorithm.train(config, ctx)`.

The same function runs in-process (`rlgen run --local`) and inside a Ray Tune trial. It always ends
its MLflow run: FINISHED, FAILED with the error as the `rlgen.error` tag (and the traceback as
`error.txt`), or KILLED when a stop was requested.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from runctx import RunContext
from service.registry import ALGORITHMS
from service.relay import RelayTracker
from service.spec import SpecBase, dump_yaml, run_params, set_dotted, spec_model
from service.store import client_for
from service.sysmetrics import SystemMonitor
from service.tracking import (
    TAG_CONTINUED_FROM,
    TAG_ERROR,
    TAG_EXPLOITS,
    TAG_INIT_FROM,
    TAG_LAUNCH,
    TAG_PARENT,
    TAG_RESTARTS,
    TAG_SEED,
    TAG_TRIAL,
    TAG_WORKER,
    RunWriter,
    Tracker,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRequest:
    """Everything a worker needs to run one trial; plain data, so Ray ships it cheaply."""

    spec: dict[str, Any]  # the resolved spec (all seeds)
    seed: int
    tracking_uri: str
    experiment_id: str
    launch_id: str
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # version, commit, spec hash
    overrides: dict[str, Any] = field(default_factory=dict)  # swept params: dotted path -> value
    relay: str | None = None  # the driver's tracking relay's socket, on the embedded cluster
    # trial label -> the run whose newest checkpoint the trial goes on from (`continue_from`)
    continue_from: dict[str, str] = field(default_factory=dict)
    # A PBT trial keeps the label of its first values while its params change (`service.tuning`).
    fixed_label: str | None = None

    def for_trial(
        self, seed: int, overrides: dict[str, Any], label: str | None = None
    ) -> TrialRequest:
        return replace(self, seed=seed, overrides=dict(overrides), fixed_label=label)

    @property
    def label(self) -> str:
        return self.fixed_label or trial_label(self.seed, self.overrides)


LABEL_MAX = 1000  # the label is the `rlgen.trial` tag, which MLflow servers cap at 8000 characters


def shown(value: Any) -> str:
    """A swept value as labels and names show it: 4 significant digits when they are the whole
    value (so that labels never collide), else its JSON."""
    short = isinstance(value, float) and float(f"{value:.4g}") == value
    return f"{value:.4g}" if short else json.dumps(value)


def trial_label(seed: int, overrides: dict[str, Any]) -> str:
    """`s0`, or `s0 learning_rate=0.001 n_step=3` for a trial of a sweep. Labels name trials'
    runs, so they stay unique: one longer than `LABEL_MAX` (a sweep over long lists) is cut and
    ends in a hash of the whole."""
    parts = [f"s{seed}", *(f"{path}={shown(value)}" for path, value in sorted(overrides.items()))]
    label = " ".join(parts)
    if len(label) <= LABEL_MAX:
        return label
    digest = hashlib.sha256(label.encode()).hexdigest()[:16]
    return f"{label[: LABEL_MAX - 21]}... #{digest}"  # 21: "... #" and the digest


@dataclass(frozen=True)
class TrialOutcome:
    run_id: str
    seed: int
    status: str  # FINISHED | FAILED | KILLED
    error: str | None = None


def pick_device(wanted: str, gpu_ids: list[Any] | tuple[Any, ...]) -> torch.device:
    """`auto`: CUDA when the trial holds a GPU (Ray's assignment, or any GPU outside Ray)."""
    if wanted == "cpu":
        return torch.device("cpu")
    has_gpu = torch.cuda.is_available() and (bool(gpu_ids) or wanted == "cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("resources.device is 'cuda' but no CUDA device is visible to this trial")
    return torch.device("cuda" if has_gpu else "cpu")


def trial_spec(request: TrialRequest) -> SpecBase:
    """The typed spec of this trial: the resolved spec with `seeds: [seed]`, and for a trial of a
    sweep its values of the swept params (the sweep itself is the parent's business)."""
    return spec_of_trial(request.spec, request.seed, request.overrides)


def spec_of_trial(spec: dict[str, Any], seed: int, overrides: dict[str, Any]) -> SpecBase:
    """A resolved spec's trial of `seed` with the swept params `overrides` set."""
    data = {**json.loads(json.dumps(spec)), "seeds": [seed], "sweep": None}
    for path, value in overrides.items():
        set_dotted(data.setdefault("params", {}), path, value)
    return spec_model(data["algorithm"]).model_validate(data)


def run_name(spec: SpecBase, seed: int) -> str:
    """`algorithm-subject-sSEED`: value_iteration-FrozenLake-v1-s0, gan-digits-s0."""
    env, dataset = getattr(spec, "env", None), getattr(spec, "dataset", None)
    if env is not None:
        subject = env.id.split("/")[-1]
    elif dataset is not None:
        subject = dataset.name
    else:
        subject = spec.name
    return f"{spec.algorithm}-{subject}-s{seed}"


NAME_MAX = 60  # the MLflow UI's runs table and chart legends show about this much


def trial_run_name(spec: SpecBase, request: TrialRequest) -> str:
    """The run's name in the MLflow UI, which cuts names short in the runs table and in chart
    legends: what tells a trial from its siblings comes first. `s0` for the seeds of one
    configuration, `learning_rate=0.001 n_step=3 s0` in a sweep (a param's last path component,
    unless two share it); a trial without a parent run is named by its experiment,
    `dqn-cartpole s0`."""
    seed = f"s{request.seed}"
    if request.parent_run_id is None:
        return f"{spec.name} {seed}"[:250]
    leaves = [path.rsplit(".", 1)[-1] for path in request.overrides]
    parts = [
        f"{leaf if leaves.count(leaf) == 1 else path}={shown(value)}"
        for leaf, (path, value) in sorted(zip(leaves, request.overrides.items(), strict=True))
    ]
    name = " ".join([*parts, seed])
    return name if len(name) <= NAME_MAX else f"{name[: NAME_MAX - 4]}... {seed}"


def run_trial(
    request: TrialRequest,
    *,
    gpu_ids: list[Any] | tuple[Any, ...] = (),
    stop_event: threading.Event | None = None,
    on_metrics: Callable[[Mapping[str, float], int, Any], None] | None = None,
    on_checkpoint: Callable[[Path, int, str], None] | None = None,
    start_checkpoint: Path | None = None,
) -> TrialOutcome:
    """Run one trial. `on_checkpoint(file, step, run_id)` hears of each checkpoint saved;
    `start_checkpoint`: a directory (`population_checkpoint`) the trial starts from, its own or,
    after a PBT exploit, another trial's."""
    spec = trial_spec(request)
    algo = ALGORITHMS[spec.algorithm]
    tracker = tracker_for(request)
    tags = {
        **request.tags,
        **spec.tags,
        TAG_LAUNCH: request.launch_id,
        TAG_SEED: str(request.seed),
        TAG_TRIAL: request.label,
        TAG_WORKER: f"{socket.gethostname()}:{os.getpid()}",
    }
    if request.parent_run_id:
        tags[TAG_PARENT] = request.parent_run_id
    source = request.continue_from.get(request.label)
    if source is not None:
        tags[TAG_CONTINUED_FROM] = source
    if spec.init_from is not None:
        tags[TAG_INIT_FROM] = spec.init_from
    if gpu_ids:
        tags["rlgen.gpu_ids"] = ",".join(map(str, gpu_ids))  # which of the node's GPUs Ray gave
    if spec.description:
        tags["mlflow.note.content"] = spec.description
    # Launch ids are unique: a run of this launch and trial exists only when the trial runs
    # again, restarted after its worker died (`max_failures`) or resumed by PBT; the trial then
    # continues that run.
    previous = tracker.find_run(request.experiment_id, request.launch_id, request.label)
    if previous is None:
        run_id = tracker.create_run(request.experiment_id, tags, trial_run_name(spec, request))
    else:
        run_id, previous_tags = previous
        if start_checkpoint is None:  # not PBT's pause or exploit: the worker died
            restarts = int(previous_tags.get(TAG_RESTARTS, "0")) + 1
            tracker.set_tag(run_id, TAG_RESTARTS, str(restarts))
        tracker.set_tag(run_id, TAG_WORKER, tags[TAG_WORKER])
    workdir = make_workdir(run_id)
    writer = RunWriter(tracker, run_id)
    status, error = "FAILED", None
    ctx: RunContext | None = None
    try:
        resolved = spec.model_dump(mode="json")
        logged_until: dict[str, int] = {}
        if previous is None:
            tracker.log_params(run_id, run_params(resolved, seed=request.seed))
            spec_file = workdir / "spec.yaml"
            spec_file.write_text(dump_yaml(resolved))
            writer.write_artifact(spec_file, "")
        else:
            logged_until = tracker.resume(run_id, str(workdir))
        checkpoints = workdir / "checkpoints"
        init_from = None
        explored = explored_params(request)
        if explored and previous is None:  # a population member's first values
            tracker.write_metrics(run_id, explored_points(explored, request, 0))
        if start_checkpoint is not None:
            donor = start_from_population(start_checkpoint, checkpoints)
            if donor["run_id"] != run_id:  # a PBT exploit: the donor's state, new values
                record_exploit(tracker, run_id, previous, donor, explored, request)
        if not any(checkpoints.glob("*.pt")):  # none of its own yet: where it starts from
            if source is not None:  # goes on from the trial it continues
                tracker.fetch_checkpoint(source, str(checkpoints))
            elif spec.init_from is not None:  # its weights, checked by `service.lineage`
                found = tracker.fetch_checkpoint(spec.init_from, str(workdir / "init"))
                if found is None:
                    raise RuntimeError(f"run {spec.init_from} has no checkpoint any more")
                (path,) = (workdir / "init").glob("*.pt")
                init_from = torch.load(path, map_location="cpu", weights_only=True)

        torch.set_num_threads(max(1, int(spec.resources.num_cpus)))
        ctx = RunContext(
            seed=request.seed,
            writer=writer,
            workdir=workdir,
            run_id=run_id,
            device=pick_device(spec.resources.device, gpu_ids),
            stop_event=stop_event,
            on_metrics=on_metrics,
            on_checkpoint=(
                (lambda path, step: on_checkpoint(path, step, run_id)) if on_checkpoint else None
            ),
            logged_until=logged_until,
            init_from=init_from,
            env=getattr(spec, "env", None),
            dataset=getattr(spec, "dataset", None),
        )
        ctx.timer.start()
        with monitor(spec.resources, ctx, logged_until):
            algo.train(spec.params, ctx)  # type: ignore[attr-defined]
        ctx.timer.stop()
        status = "KILLED" if ctx.should_stop() else "FINISHED"
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
    except (torch.OutOfMemoryError, MemoryError) as e:
        status, error = "FAILED", out_of_memory(e, spec.resources, ctx)
        log.error("trial %s (seed %d) failed: %s", run_id, request.seed, error)
        (workdir / "error.txt").write_text(traceback.format_exc())
        _best_effort(lambda: tracker.write_artifact(run_id, str(workdir / "error.txt"), ""))
    except Exception as e:
        status, error = "FAILED", f"{type(e).__name__}: {e}"
        log.error("trial %s (seed %d) failed: %s", run_id, request.seed, error)
        (workdir / "error.txt").write_text(traceback.format_exc())
        _best_effort(lambda: tracker.write_artifact(run_id, str(workdir / "error.txt"), ""))
    except BaseException:
        # SystemExit & co.: the worker is being shut down (a scheduler stopped the trial, or it
        # was cancelled). Save what was logged, end the run KILLED, and let the exit proceed;
        # the driver records why.
        status = "KILLED"
        raise
    finally:
        if ctx is not None:
            ctx.timer.stop()
            try:
                # The last point of the algorithm's time/train_s curve or, where it draws none
                # (the DP solvers, the generative models), a one-off result.
                train_s = {"time/train_s": ctx.timer.elapsed()}
                if "time/train_s" in ctx.metrics.last:
                    ctx.log_metrics(train_s, step=ctx.metrics.last_step)
                else:
                    ctx.log_summary(train_s)
                ctx.close()
            except Exception as e:  # refused, or not written even after retries
                status, error = "FAILED", error or f"metrics were not written: {e}"
        if error:
            _best_effort(lambda: tracker.set_tag(run_id, TAG_ERROR, error[:5000]))
        _best_effort(lambda: tracker.set_terminated(run_id, status))
        tracker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return TrialOutcome(run_id, request.seed, status, error)


def out_of_memory(error: BaseException, resources: Any, ctx: RunContext | None) -> str:
    """A trial that ran out of memory: what did not fit, and what to change. It fails like any
    error of its algorithm (FAILED, not retried): a rerun would run out again."""
    first = (str(error).strip().splitlines() or [""])[0]
    device = ctx.device if ctx is not None else None
    if device is not None and device.type == "cuda":
        held = torch.cuda.max_memory_reserved(device) / 1024**3
        share = resources.num_gpus
        where = (
            f"out of GPU memory on {device} (PyTorch held up to {held:.1f} GiB; the trial "
            f"reserved num_gpus: {share:g}, {'a shared' if share < 1 else 'a whole'} GPU)"
        )
        advice = "lower the batch size, buffer or model, or give each trial more of a GPU"
    else:
        where, advice = "out of host memory", "lower the batch size, buffer or data set"
    return f"OutOfMemoryError: {where}: {first[:500]}; {advice}"


def monitor(
    resources: Any, ctx: RunContext, logged_until: Mapping[str, int]
) -> AbstractContextManager[Any]:
    """The trial's system metrics, sampled while it trains (nothing if switched off)."""
    if not resources.system_metrics_s:
        return nullcontext()
    first = logged_until.get("system/cpu_utilization_percentage", 0) + 1
    return SystemMonitor(ctx.metrics.log_side, resources.system_metrics_s, ctx.device, first)


# -- population-based training ---------------------------------------------------------------
LINEAGE_FILE = "lineage.json"  # in a population checkpoint: which trial's run saved it, when


def explored_params(request: TrialRequest) -> list[str]:
    """The params PBT explores in this trial's sweep (none outside PBT)."""
    scheduler = (request.spec.get("sweep") or {}).get("scheduler") or {}
    if scheduler.get("type") != "pbt":
        return []
    return sorted(scheduler["hyperparam_mutations"])


def explored_points(
    paths: list[str], request: TrialRequest, step: int
) -> list[tuple[str, float, int, int]]:
    """The explored params' current values as `pbt/<path>` metric points: in the MLflow UI,
    each member's hyperparameter schedule is a curve beside its learning curve."""
    now = int(time.time() * 1000)
    return [
        (f"pbt/{path}", float(request.overrides[path]), step, now)
        for path in paths
        if isinstance(request.overrides.get(path), (int, float))
    ]


def population_checkpoint(file: Path, step: int, run_id: str, label: str, into: Path) -> Path:
    """A directory for Ray Tune: the checkpoint file and who saved it at which step."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy2(file, into / file.name)
    lineage = {"run_id": run_id, "label": label, "step": step}
    (into / LINEAGE_FILE).write_text(json.dumps(lineage))
    return into


def start_from_population(directory: Path, checkpoints: Path) -> dict[str, Any]:
    """Make the population checkpoint in `directory` the one the algorithm resumes from;
    return who saved it (see `population_checkpoint`)."""
    lineage: dict[str, Any] = json.loads((directory / LINEAGE_FILE).read_text())
    # The file of that step: a trial restored by Tune may report into a checkpoint directory
    # of an earlier life, so it can hold an older file besides (the lineage is the newest).
    source = directory / f"step_{int(lineage['step']):010d}.pt"
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    shutil.copy2(source, checkpoints / source.name)
    return lineage


def record_exploit(
    tracker: Tracker | RelayTracker,
    run_id: str,
    previous: tuple[str, dict[str, str]] | None,
    donor: dict[str, Any],
    explored: list[str],
    request: TrialRequest,
) -> None:
    """The lineage in the run: a line per exploit in the `rlgen.pbt.exploits` tag (the newest
    kept when long), and the new values as `pbt/<path>` points at the donor's step."""
    values = " ".join(f"{p}={request.overrides.get(p)!r}" for p in explored)
    line = f"step {donor['step']}: from {donor['label']} (run {donor['run_id']}) with {values}"
    before = previous[1].get(TAG_EXPLOITS, "") if previous else ""
    text = f"{before}\n{line}".strip()
    tracker.set_tag(run_id, TAG_EXPLOITS, text[-5000:])
    tracker.write_metrics(run_id, explored_points(explored, request, int(donor["step"])))
    log.info("trial %s exploits %s", request.label, line)


OWNER_FILE = ".owner"  # in a trial's directory: the pid of the process using it


def make_workdir(run_id: str) -> Path:
    """A fresh directory for the trial's files, after removing those abandoned on this machine."""
    remove_abandoned_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"rlgen-{run_id[:8]}-"))
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    return workdir


def remove_abandoned_workdirs(root: Path | None = None) -> int:
    """Remove trial directories whose process is gone: a worker killed mid-trial, or a trial a
    scheduler stopped (its thread never reaches the cleanup). Their checkpoints and files are in
    MLflow already. Directories without an owner file are left alone. Returns how many went."""
    removed = 0
    for d in Path(root or tempfile.gettempdir()).glob("rlgen-*-*"):
        try:
            pid = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
        except PermissionError:
            pass  # alive, another user's
    return removed


def tracker_for(request: TrialRequest) -> Tracker | RelayTracker:
    """How this trial reaches MLflow (see `service.tracking`): through the driver's relay on the
    embedded cluster, else MLflow in this process."""
    if request.relay is not None:
        relay = RelayTracker(request.relay)
        relay.connect()  # OSError: the driver is gone, and with it the launch
        return relay
    return Tracker(client_for(request.tracking_uri))


def imported() -> int:
    """The worker's pid; a Ray task running it imports this module (torch, the algorithms) in its
    worker, which then runs trials without importing them again (`service.execution.warm_up`)."""
    return os.getpid()


def run_on_ray_worker(request: TrialRequest) -> TrialOutcome:
    """A single trial as a plain Ray task (see `service.execution.run_task`)."""
    import ray

    return run_trial(request, gpu_ids=ray.get_gpu_ids())


def _best_effort(fn: Any) -> None:
    try:
        fn()  # retried already (`Tracker`)
    except Exception as e:
        log.error("tracking call failed for good: %s", e)
