"""A helper process that writes one run's metrics to MLflow, off the training process.

MLflow's `log_batch` spends ~0.1 ms a metric in SQLAlchemy ORM code that holds the GIL; in the
training process that time competes with the training loop, threads or not. `ProcessWriter` hands
batches to this helper over a pipe instead (pickling costs ~1 us a point) and waits for each
acknowledgement with the GIL released, so errors still come back to the caller, whose
`MetricLogger` keeps the batch and retries.

The helper costs ~2 s of CPU to import MLflow, which on a busy machine (two trials on two cores)
is more than most trials ever spend writing. So batches are written in-process until that has
cost `spawn_after_cost_s` of the writing thread's CPU time; only then is the helper started (at a
lower priority, so it uses idle cores first), and until it is ready writes stay in-process. A
trial logging a few points a second never starts one. Should the helper die, its unacknowledged
batch and everything after it are written in-process: nothing is dropped.

Trials that open MLflow themselves use it (`--local`, clusters started with `ray start`); on the
embedded cluster the driver writes for them (`service.relay`, which shares this framing).

Protocol on stdin/stdout: the helper writes b"R" once ready; then each request is a 4-byte
big-endian length and a pickled list of MetricPoint tuples, each answered the same way with the
pickled error text, or None for success.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from service.points import MetricPoint

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
_LEN = struct.Struct(">I")


def send_frame(stream: IO[bytes] | io.BufferedIOBase, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def recv_frame(stream: IO[bytes] | io.BufferedIOBase) -> Any:
    header = stream.read(_LEN.size)
    if len(header) < _LEN.size:
        raise EOFError("metric writer pipe closed")
    (size,) = _LEN.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("metric writer pipe closed mid-message")
    return pickle.loads(data)


class ProcessWriter:
    """`service.context.Writer` whose metric writes move to a helper process in long trials."""

    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        run_id: str,
        spawn_after_cost_s: float = 0.3,
    ):
        from service.tracking import MlflowWriter

        self.inline = MlflowWriter(client, run_id)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.spawn_after_cost_s = spawn_after_cost_s
        self.inline_cost_s = 0.0  # CPU seconds spent writing metrics in-process so far
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.gave_up = False

    def _helper(self) -> subprocess.Popen[bytes] | None:
        """The helper, once it is ready to take batches; None until then (or after it failed)."""
        if self.gave_up:
            return None
        if self.proc is None:
            if self.inline_cost_s >= self.spawn_after_cost_s:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "service.metric_writer", self.tracking_uri, self.run_id],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            return None
        if not self.ready:
            assert self.proc.stdout is not None
            if select.select([self.proc.stdout], [], [], 0)[0]:
                self.ready = self.proc.stdout.read(1) == b"R"
                if not self.ready:
                    self._give_up("metric writer failed to start")
        return self.proc if self.ready else None

    def _give_up(self, why: str) -> None:
        log.warning("%s; writing metrics in-process", why)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc, self.ready, self.gave_up = None, False, True

    def write_metrics(self, points: Sequence[MetricPoint]) -> None:
        helper = self._helper()
        if helper is None:
            started = time.thread_time()
            try:
                self.inline.write_metrics(points)
            finally:
                self.inline_cost_s += time.thread_time() - started
            return
        assert helper.stdin is not None and helper.stdout is not None
        try:
            send_frame(helper.stdin, [tuple(p) for p in points])
            error = recv_frame(helper.stdout)  # waits with the GIL released
        except (OSError, EOFError) as e:  # the helper died: the batch was not acknowledged
            self._give_up(f"metric writer died ({e})")
            self.inline.write_metrics(points)
            return
        if error is not None:
            raise RuntimeError(error)  # the logger keeps the batch and retries

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        self.inline.write_artifact(local_path, artifact_dir)  # rare, large: file copies anyway

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        self.inline.write_image(local_path, key, step)

    def close(self) -> None:
        if self.proc is None:
            return
        if not self.ready:  # still importing: it holds nothing, so it need not finish starting
            self.proc.kill()
        elif self.proc.stdin:
            self.proc.stdin.close()  # EOF: the helper exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None


def main(argv: Sequence[str]) -> int:
    from service.tracking import MlflowWriter, client_for

    uri, run_id = argv
    os.nice(5)  # idle cores first: never slow the trials this process serves
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel...
    os.dup2(2, 1)  # ...and anything a library prints goes to stderr instead
    requests = sys.stdin.buffer
    writer = MlflowWriter(client_for(uri), run_id)
    out.write(b"R")
    out.flush()
    while True:
        try:
            batch = recv_frame(requests)
        except EOFError:
            return 0
        try:
            writer.write_metrics([MetricPoint(*p) for p in batch])
            send_frame(out, None)
        except Exception as e:
            send_frame(out, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
