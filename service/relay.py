"""The driver's tracking relay: on the embedded cluster, trials reach MLflow through it.

The driver serves `Tracker(client_for(tracking_uri))` on a Unix socket (`Relay`), and each trial
asks it there (`RelayTracker`): the driver has MLflow loaded already, so the trials' processes
never import it, and a SQLite store has one writer, the driver, however many trials run. See
`service.tracking` for the path a metric takes.

Each request is a frame `(method, args)`, answered `(True, result)` or `(False, (transient,
"Type: message"))`: the trial's retries and its metric logger's buffer work as with MLflow
in-process (`is_transient`). Only the methods in `Tracker.REMOTE` are served. The socket lives in
a directory only this user can open, and peers are this user's own processes, so frames are
pickled. A frame is a 4-byte big-endian length and the pickled object.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import socket
import socketserver
import struct
import threading
from typing import IO, Any

from service.cluster import private_dir
from service.store import client_for
from service.tracking import Tracker, is_transient

_LEN = struct.Struct(">I")


def send_frame(stream: IO[bytes] | io.BufferedIOBase, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def recv_frame(stream: IO[bytes] | io.BufferedIOBase) -> Any:
    header = stream.read(_LEN.size)
    if len(header) < _LEN.size:
        raise EOFError("relay connection closed")
    (size,) = _LEN.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("relay connection closed mid-message")
    return pickle.loads(data)


class Relay:
    """Serves `Tracker(client_for(tracking_uri))` on a Unix socket until `close()`."""

    def __init__(self, tracking_uri: str):
        self.tracker = Tracker(client_for(tracking_uri))
        self._dir = private_dir("rlgen.relay-")  # mode 0700: this user only
        self.address = os.path.join(self._dir, "socket")
        # One call at a time into a database store: SQLite takes one writer anyway, and MLflow's
        # SQLAlchemy store is then never entered by two threads at once. A tracking server takes
        # concurrent requests: there one trial's call, retrying through an outage, does not hold
        # up the other trials' calls.
        lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext()
            if tracking_uri.startswith(("http://", "https://"))
            else threading.Lock()
        )
        tracker = self.tracker
        self._connections: set[socket.socket] = set()
        connections = self._connections

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                connections.add(self.connection)
                try:
                    self.serve()
                finally:
                    connections.discard(self.connection)

            def serve(self) -> None:
                while True:
                    try:
                        method, args = recv_frame(self.rfile)
                    except (EOFError, OSError):
                        return  # the trial is done (or its worker died)
                    if method not in Tracker.REMOTE:
                        reply: tuple[bool, Any] = (False, (False, f"no method {method!r}"))
                    else:
                        try:
                            with lock:
                                reply = (True, getattr(tracker, method)(*args))
                        except Exception as e:
                            reply = (False, (is_transient(e), f"{type(e).__name__}: {e}"))
                    try:
                        send_frame(self.wfile, reply)
                    except OSError:
                        return

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True  # a worker killed mid-call never holds the driver up

        try:
            self._server = Server(self.address, Handler)
        except OSError:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._thread = threading.Thread(
            # Polls for `close()` every 50 ms (the default 0.5 s would hold up every launch's end).
            target=self._server.serve_forever,
            args=(0.05,),
            name="rlgen-relay",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, also the trials still connected: the launch is over."""
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RelayError(RuntimeError):
    """The driver could not do what the trial asked (its message says why); `transient`: the
    driver's own call failed in a way that may pass if tried again (see `is_transient`)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class RelayTracker:
    """The worker's side of the relay: `Tracker`'s methods, asked of the driver."""

    def __init__(self, address: str):
        self.address = address
        self._conn: tuple[socket.socket, Any, Any] | None = None  # socket, reader, writer
        self._lock = threading.Lock()  # the metric logger's thread and the trial's share it

    def connect(self) -> None:
        """Connect now (calls connect on demand); OSError when no relay answers there."""
        with self._lock:
            try:
                self._connect_locked()
            except OSError:
                self.close_locked()
                raise

    def _connect_locked(self) -> tuple[socket.socket, Any, Any]:
        if self._conn is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._conn = (sock, sock.makefile("rb"), sock.makefile("wb"))
            sock.connect(self.address)
        return self._conn

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            try:
                conn = self._connect_locked()
                send_frame(conn[2], (method, args))
                ok, value = recv_frame(conn[1])  # waits with the GIL released
            except (OSError, EOFError) as e:
                self.close_locked()
                raise ConnectionError(f"the driver's tracking relay went away ({e})") from None
        if not ok:
            transient, message = value
            raise RelayError(message, transient)
        return value

    def close_locked(self) -> None:
        for part in self._conn or ():
            with contextlib.suppress(OSError):
                part.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    def find_run(
        self, experiment_id: str, launch_id: str, label: str
    ) -> tuple[str, dict[str, str]] | None:
        found = self._call("find_run", experiment_id, launch_id, label)
        return None if found is None else (found[0], found[1])

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str) -> str:
        return str(self._call("create_run", experiment_id, tags, run_name))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("set_tag", run_id, key, value)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self._call("log_params", run_id, params)

    def resume(self, run_id: str, workdir: str) -> dict[str, int]:
        return dict(self._call("resume", run_id, workdir))

    def fetch_checkpoint(self, run_id: str, directory: str) -> str | None:
        return self._call("fetch_checkpoint", run_id, directory)

    def write_metrics(self, run_id: str, points: list[tuple[Any, ...]]) -> None:
        self._call("write_metrics", run_id, points)

    def write_artifact(self, run_id: str, local_path: str, artifact_dir: str) -> None:
        self._call("write_artifact", run_id, local_path, artifact_dir)

    def write_image(self, run_id: str, local_path: str, key: str, step: int) -> None:
        self._call("write_image", run_id, local_path, key, step)

    def set_terminated(self, run_id: str, status: str) -> None:
        self._call("set_terminated", run_id, status)
