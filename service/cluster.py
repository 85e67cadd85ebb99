"""Starting or joining Ray.

Two deployments (`service.execution` says how trials reach MLflow in each):
- embedded: `rlgen run` with no address starts a private local Ray for the command's lifetime;
- cluster: `--address HOST:PORT`, `auto` or RAY_ADDRESS joins a running cluster (`ray start`,
  docker-compose.yml, a Ray Job's driver).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

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

# Where `ray start` records the address that `ray.init(address="auto")` joins.
CURRENT_CLUSTER_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"

_embedded_gcs: str | None = None  # the GCS address of the cluster `start_ray` started, if any


def start_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start an embedded one; idempotent.

    `init_kwargs` go to `ray.init` (e.g. `num_cpus`, `num_gpus` of an embedded cluster).
    """
    global _embedded_gcs
    if ray.is_initialized():
        return
    # Embedded means a fresh local Ray, even when `ray start` left a cluster on this machine;
    # RAY_ADDRESS (or --address) is how to join one.
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    check_reachable(target)
    ray.init(address=target, **RAY_INIT_KWARGS, **init_kwargs)
    _embedded_gcs = ray.get_runtime_context().gcs_address if target == "local" else None
    # Tune looks for the result files of the loggers we disabled; MLflow has the results.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def check_reachable(target: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at an explicit `host:port` (or `ray://host:port`), or at
    the cluster `auto` finds (the last `ray start` on this machine, which may be long gone):
    `ray.init` would retry the GCS for minutes before giving up."""
    if target == "auto":
        try:
            target = CURRENT_CLUSTER_FILE.read_text().strip()
        except OSError:
            return  # no cluster was started here: ray.init says so at once
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


def embedded() -> bool:
    """Whether Ray runs as the embedded cluster `start_ray` started."""
    return (
        _embedded_gcs is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _embedded_gcs
    )


def embedded_session_dir() -> str | None:
    """The Ray session directory of the embedded cluster (None on others): every process of the
    cluster holds files in it. Read off the node's socket paths (`ray.nodes()`), which live in
    `<session>/sockets/`."""
    if not embedded():
        return None
    for node in ray.nodes():
        socket_path = node.get("RayletSocketName") or node.get("ObjectStoreSocketName")
        if node.get("Alive") and socket_path:
            return str(Path(socket_path).parent.parent)
    return None


def private_dir(prefix: str) -> str:
    """A new directory only this user can open (`tempfile.mkdtemp`), named `{prefix}{pid}-...`;
    first removes this user's `prefix` directories whose process is gone (killed by SIGKILL,
    say, before it could remove its own)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid, dash, _ = name.removeprefix(prefix).partition("-")
        path = os.path.join(root, name)
        if not (name.startswith(prefix) and dash and pid.isdigit()) or alive(int(pid)):
            continue
        try:
            if os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # gone meanwhile
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def warm_up() -> None:
    """Ray's `worker_process_setup_hook` on the embedded cluster: import what trials run
    (torch and the algorithms), as a worker starts, while the driver is still busy."""
    import service.trial  # noqa: F401
