"""A watcher that ends what a killed `rlgen run` leaves behind.

SIGKILL (the OOM killer, `kill -9`, a CI or batch-system timeout) gives the driver no chance to end
its runs or stop its embedded cluster: the runs would stay RUNNING in MLflow forever, and Ray's
dashboard and runtime-env agents (~200 MB between them) outlive their raylet, waiting on a GCS
that is gone. So `launch` starts this watcher as a process of its own, with a pipe on its stdin:

    {"tracking_uri": ..., "experiment_id": ..., "launch_id": ..., "session_dir": ...}\\n  (at once)
    interrupted\\n                        (Ctrl-C or SIGTERM: the runs are to end KILLED)
    done\\n                               (the driver ended every run itself)
    end FAILED|KILLED reason\\n            (the launch gave up on an error: end what is active)

End of file with neither means the driver died: the watcher then kills what is left of its
embedded cluster (Ray's processes with a file open in the cluster's session directory) and ends
the launch's active runs, KILLED after an interrupt and FAILED otherwise, with the reason in
`rlgen.error`. The URI travels through the pipe, not the command line, where any user could
read a password in it.

Until then it imports only the standard library and sleeps in `read`: it costs a launch ~50 ms
of CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

DONE, INTERRUPTED, END = b"done\n", b"interrupted\n", b"end "


class Watchdog:
    """The driver's side: start the watcher, tell it how the launch ended (a context manager)."""

    def __init__(
        self, tracking_uri: str, experiment_id: str, launch_id: str, session_dir: str | None = None
    ):
        """`session_dir`: the Ray session directory of the embedded cluster this process
        started, whose remains the watcher stops should this process die."""
        header = {
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "launch_id": launch_id,
            "session_dir": session_dir,
            "driver_pid": os.getpid(),
        }
        env = dict(os.environ)
        # Importable also from a source tree that was never installed.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "service.watchdog"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # outlives a kill of the driver's process group
            )
            self._say(json.dumps(header).encode() + b"\n")
        except OSError as e:  # e.g. no processes left to fork: the launch still runs
            log.warning("no watcher for this launch's runs (%s)", e)
            self._proc = None

    def _say(self, line: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except OSError:  # the watcher is gone (BrokenPipeError): nothing to tell it
            self._proc = None

    def interrupted(self) -> None:
        self._say(INTERRUPTED)

    def close(self, error: BaseException | None = None) -> None:
        """Say `done`, or that the launch gave up on `error`: the watcher then ends the runs
        still active (KILLED after Ctrl-C, else FAILED)."""
        if error is None:
            self._say(DONE)
        elif isinstance(error, KeyboardInterrupt):
            self._say(END + b"KILLED interrupted\n")
        else:
            reason = f"the launch failed: {type(error).__name__}: {error}".replace("\n", " ")
            self._say(END + b"FAILED " + reason.encode()[:4000] + b"\n")
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        self._proc = None

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(error)


def kill_cluster(session_dir: str) -> int:
    """SIGKILL this user's Ray processes that hold a file open in `session_dir`, the session
    directory of a dead driver's embedded cluster (its logs, its sockets). Its raylet and workers
    die with the driver, but its agents can hang on: they report their raylet's death to a GCS
    that is gone. Linux (/proc); elsewhere nothing. Returns how many it killed."""
    killed = 0
    for pid, _ in cluster_processes(session_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:  # gone meanwhile
            continue
    return killed


def cluster_processes(session_dir: str) -> list[tuple[int, bytes]]:
    """(pid, command line) of this user's Ray processes that hold a file open in `session_dir`
    (every process of that cluster does: its log files); not, say, a `tail -f` on a log."""
    prefix = os.path.join(os.path.realpath(session_dir), "")
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if not (cmdline.startswith(b"ray::") or b"/ray/" in cmdline):  # Ray's titles, paths
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix) for fd in fds):
                found.append((pid, cmdline))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def end_runs(header: dict[str, Any], status: str, reason: str) -> int:
    """End the launch's runs (its parent too) that are still active; returns how many."""
    from service.store import client_for
    from service.tracking import SEARCH_MAX, TAG_LAUNCH, close_dangling

    client = client_for(header["tracking_uri"])
    runs = client.search_runs(
        [header["experiment_id"]],
        filter_string=f"tags.`{TAG_LAUNCH}` = '{header['launch_id']}'",
        max_results=SEARCH_MAX,
    )
    return close_dangling(client, runs, status, reason)


def main() -> None:
    logging.basicConfig(format="rlgen: %(message)s", level=logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    stdin = sys.stdin.buffer
    first = stdin.readline()
    lines = stdin.read().splitlines(keepends=True)  # until the driver closes its end, or dies
    if not first or DONE in lines:
        return
    header = json.loads(first)
    end = next((line for line in lines if line.startswith(END)), None)
    if end is not None:  # the driver lives on (an error it reports): its cluster stays
        status, _, reason = end.removeprefix(END).decode(errors="replace").partition(" ")
    else:  # the driver died: end its cluster first, so that no worker writes after its run ended
        if header["session_dir"]:
            kill_cluster(header["session_dir"])
        status = "KILLED" if INTERRUPTED in lines else "FAILED"
        reason = f"the driver (pid {header['driver_pid']}) died before it ended this run"
    reason = reason.strip()
    try:
        ended = end_runs(header, status, reason)
    except Exception as e:  # e.g. the tracking server is down too: say which runs stay open
        log.error("could not end the runs of launch %s: %s", header["launch_id"], e)
        return
    if ended:
        log.info("%d run(s) left active ended %s: %s", ended, status, reason)


if __name__ == "__main__":
    main()
