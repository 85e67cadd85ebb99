"""Starting or joining Ray, kept light: `rlgen run` starts Ray while another thread imports the
algorithms, so this module imports nothing of rlgen's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import ray

# Set before Ray starts: its workers inherit this environment.
# Tune's own CSV/JSON/TensorBoard loggers duplicate what MLflow records; its SIGINT handler would
# swallow Ctrl-C, which we handle ourselves (runs end KILLED).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Trials keep the job's working directory instead of moving into a Tune trial directory, which
# on another node may not exist (or be cleaned up under a running trial); MLflow holds the files.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")


# How every driver joins or starts Ray: Ray's own logging would clutter the progress table, the
# workers' output stays in the session's log files, and an embedded cluster serves no dashboard.
RAY_INIT_KWARGS: dict[str, Any] = {
    "include_dashboard": False,
    "log_to_driver": False,
    "logging_level": logging.ERROR,
    "configure_logging": True,
}
# Ray's settings for the embedded cluster (with `lean_head`, the cluster `rlgen run` starts;
# benchmarks/service_overhead.py starts the same one for its baseline).
EMBEDDED_SYSTEM_CONFIG: dict[str, Any] = {
    # Ray retires idle workers beyond the node's *available* CPUs. Tune reserves a trial's CPUs
    # (its placement group) before the trial's actor takes a worker, so now and then both warm
    # workers were retired in between and the trials waited ~3 s for fresh processes to import
    # everything. This cluster lives as long as the command: it keeps its workers.
    "kill_idle_workers_interval_ms": 0,
    # The raylet starts its workers (one per CPU) as soon as it is up, not when the driver
    # registers (and `ray.init` then waits for them to connect): they import what trials need
    # (`service.preload`) while the driver is still starting. ~0.3 s sooner out of `ray.init`,
    # ~0.6 s sooner to a single trial's end here.
    "enable_worker_prestart": True,
}

_embedded_gcs: str | None = None  # the GCS address of the cluster `start_ray` started, if any
PRELOAD_DIR_ENV = "RLGEN_PRELOAD_DIR"  # where the embedded cluster's workers claim preload slots


def start_ray(
    address: str | None = None,
    *,
    preload_workers: int | Literal["later"] | None = None,
    **init_kwargs: Any,
) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start an embedded one; idempotent.

    Call it from the main thread: Ray ties its daemons' lives to the thread that started them.
    `preload_workers`: how many of the embedded cluster's prestarted workers import what trials
    need (the trials that will run at once); None: every one; "later": the caller says it soon
    with `set_preload_workers` (see `service.preload`).
    `init_kwargs` go to `ray.init` (e.g. `num_cpus`, `num_gpus` of an embedded cluster).
    """
    global _embedded_gcs
    if ray.is_initialized():
        return
    # Embedded means a fresh local Ray, even when `ray start` left a cluster on this machine;
    # RAY_ADDRESS (or --address) is how to join one.
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(target)
    if target == "local":
        # Its prestarted workers import what trials need while Ray and the driver start; they
        # inherit this environment, so they find the directory where they claim a slot.
        if preload_workers is None:
            os.environ.pop(PRELOAD_DIR_ENV, None)
        else:
            directory = private_dir("rlgen.preload-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            os.environ[PRELOAD_DIR_ENV] = directory
            if preload_workers != "later":
                set_preload_workers(preload_workers)
        init_kwargs["_system_config"] = {
            "preload_python_modules": ["service.preload"],
            **EMBEDDED_SYSTEM_CONFIG,
            **init_kwargs.get("_system_config", {}),
        }
    with lean_head() if target == "local" else contextlib.nullcontext():
        ray.init(address=target, **RAY_INIT_KWARGS, **init_kwargs)
    _embedded_gcs = ray.get_runtime_context().gcs_address if target == "local" else None
    # Tune looks for the result files of the loggers we disabled; MLflow has the results.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


@contextlib.contextmanager
def lean_head() -> Iterator[None]:
    """While it lasts, a Ray head started in this process leaves out three of its Python daemons:
    the autoscaler's monitor (one machine: nothing to scale), the log monitor (it forwards the
    workers' output to the driver, which `log_to_driver=False` turns off; the files stay in the
    session's logs) and the API server, which on an embedded cluster serves nobody (Jobs and
    state APIs; `include_dashboard=False` only leaves out the dashboard's pages). They cost ~2.5 s
    of CPU while the command imports torch on two cores, and ~1 s to stop.

    `ray start` has flags for the first two (`--no-monitor`, `--include-log-monitor`), `ray.init`
    none, so this wraps the private `Node.start_head_processes` of the pinned Ray; should that
    move, Ray starts them as before (a test checks which processes run).
    """
    try:
        from ray._private.node import Node

        start = Node.start_head_processes
    except (ImportError, AttributeError):
        yield
        return

    def start_lean(node: Any) -> None:
        params = node._ray_params
        params.no_monitor = True  # read here, in start_head_processes
        params.include_log_monitor = False  # read next, in start_ray_processes
        node.start_api_server = lambda **kwargs: None
        start(node)

    Node.start_head_processes = start_lean  # type: ignore[method-assign]
    try:
        yield
    finally:
        Node.start_head_processes = start  # type: ignore[method-assign]


def private_dir(prefix: str) -> str:
    """A new directory only this user can open (`tempfile.mkdtemp`), named `{prefix}{pid}-...`;
    first removes this user's `prefix` directories whose process is gone (killed by SIGKILL,
    say, before it could remove its own)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid, dash, _ = name.removeprefix(prefix).partition("-")
        path = os.path.join(root, name)
        if not (name.startswith(prefix) and dash and pid.isdigit()) or _alive(int(pid)):
            continue
        try:
            if os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # gone meanwhile
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def set_preload_workers(count: int) -> None:
    """Tell the embedded cluster's workers that `count` of them should preload (no-op on other
    clusters). Until it is said, the first worker preloads and the others wait for it (up to
    `service.preload.WAIT_S`, then they preload too)."""
    directory = os.environ.get(PRELOAD_DIR_ENV)
    if directory is None or not os.path.isdir(directory):
        return
    tmp = os.path.join(directory, "slots.tmp")
    with open(tmp, "w") as f:
        f.write(str(max(1, count)))
    os.replace(tmp, os.path.join(directory, "slots"))  # atomic: never a half-written number


def _check_reachable(target: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at an explicit `host:port` (or `ray://host:port`), or at
    the cluster `auto` finds (the last `ray start` on this machine, which may be long gone):
    ray.init would retry the GCS for minutes before giving up."""
    if target == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # Ray's internals moved: ray.init resolves and reports it
            return
        try:
            target = canonicalize_bootstrap_address_or_die("auto")  # ConnectionError: none found
        except ValueError:  # e.g. RAY_ADDRESS=ray://...: Ray Client, which ray.init handles
            return
    host, sep, port = target.removeprefix("ray://").rpartition(":")
    if target == "local" or not sep or not port.isdigit() or "/" in host:
        return  # ray.init resolves or reports these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"nothing answers at {host}:{port} ({e}); is the Ray head running there "
            "(`ray start --head`)?"
        ) from None


def embedded_session_dir() -> str | None:
    """The Ray session directory of the embedded cluster (None on others, or should Ray's
    internals move): every process of the cluster holds files in it."""
    if not embedded():
        return None
    try:
        from ray._private.worker import global_worker

        node = global_worker.node
    except (ImportError, AttributeError):
        return None
    return str(node.get_session_dir_path()) if node is not None else None


def embedded() -> bool:
    """Whether Ray runs as the embedded cluster `start_ray` started: its workers inherit this
    process's environment and import `service.preload` before they accept work."""
    return (
        _embedded_gcs is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _embedded_gcs
    )
