"""The run context's plumbing: batching, the training clock, checkpoints, stop requests."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runctx import InMemoryWriter, MetricLogger, RejectedError, RunContext
from runctx.context import stream_seed


def test_metrics_are_buffered_and_written_in_batches() -> None:
    writer = InMemoryWriter()
    logger = MetricLogger(writer, max_buffer=100, flush_interval_s=3600, background=False)
    for step in range(250):
        logger.log({"losses/a": step, "losses/b": torch.tensor(2.0 * step)}, step=step)
    assert writer.batches == 5  # 500 points in batches of 100, not 500 writes
    logger.flush()
    assert writer.metrics["losses/a"][-1] == (249, 249.0)
    assert writer.metrics["losses/b"][10] == (10, 20.0)
    assert logger.last == {"losses/a": 249.0, "losses/b": 498.0}


def test_metrics_flush_after_the_interval() -> None:
    writer = InMemoryWriter()
    logger = MetricLogger(writer, max_buffer=10_000, flush_interval_s=0.05, background=False)
    logger.log({"x/y": 1}, step=0)
    assert writer.batches == 0
    time.sleep(0.06)
    logger.log({"x/y": 2}, step=1)
    assert writer.batches == 1 and len(writer.metrics["x/y"]) == 2


def test_failed_writes_keep_the_buffer() -> None:
    class Flaky(InMemoryWriter):
        fail = True

        def write_metrics(self, points):  # type: ignore[no-untyped-def]
            if self.fail:
                raise ConnectionError("tracking server down")
            super().write_metrics(points)

    writer = Flaky()
    logger = MetricLogger(writer, max_buffer=1000, background=False)
    logger.log({"a/b": 1}, step=0)
    with pytest.raises(ConnectionError):
        logger.flush()
    logger.log({"a/b": 2}, step=1)
    writer.fail = False
    logger.flush()
    assert writer.metrics["a/b"] == [(0, 1.0), (1, 2.0)]  # nothing lost, order kept


def test_background_writer_keeps_training_thread_free_and_loses_nothing() -> None:
    import threading

    class Slow(InMemoryWriter):
        threads: set[str] = set()  # noqa: RUF012
        fail_first = True

        def write_metrics(self, points):  # type: ignore[no-untyped-def]
            self.threads.add(threading.current_thread().name)
            time.sleep(0.05)  # a slow tracking server
            if self.fail_first:
                self.fail_first = False
                raise ConnectionError("server restarting")
            super().write_metrics(points)

    writer = Slow()
    logger = MetricLogger(writer, max_buffer=50, flush_interval_s=3600)
    t = time.perf_counter()
    for step in range(1000):
        logger.log({"a/b": step}, step=step)
    assert time.perf_counter() - t < 0.5  # 20 batches x 50 ms were not paid by the caller
    logger.close()
    assert "rlgen-metrics" in writer.threads  # batches were written by the background thread
    assert [s for s, _ in writer.metrics["a/b"]] == list(range(1000))  # all, in order, once


def test_metric_names_are_checked() -> None:
    logger = MetricLogger(InMemoryWriter())
    for bad in ("bad\nname", "a//b", "x" * 251, "", "../up"):
        with pytest.raises(ValueError, match="metric name"):
            logger.log({bad: 1}, step=0)
    with pytest.raises(ValueError, match="64-bit"):
        logger.log({"x/y": 1}, step=2**70)


def test_train_timer_excludes_paused_time(tmp_path: Path) -> None:
    ctx = RunContext.in_memory(workdir=tmp_path)
    ctx.timer.start()
    time.sleep(0.05)
    with ctx.timer.paused():
        time.sleep(0.2)
        with ctx.timer.paused():  # nesting does not double count
            time.sleep(0.05)
    ctx.timer.stop()
    assert 0.04 < ctx.timer.elapsed() < 0.15


def test_pauses_after_the_timer_stopped_take_nothing_off(tmp_path: Path) -> None:
    """A final evaluation after `stop()` (DQN's) used to be subtracted: negative train time."""
    timer = RunContext.in_memory(workdir=tmp_path).timer
    timer.start()
    time.sleep(0.1)
    with timer.paused():
        time.sleep(0.05)
        timer.stop()  # stopped during a pause: the pause's first part still comes off
        time.sleep(0.1)
    with timer.paused():
        time.sleep(0.2)
    assert 0.09 < timer.elapsed() < 0.14


def test_train_time_is_measured_without_a_pause_in_progress_and_carried_into_a_restart(
    tmp_path: Path,
) -> None:
    first = RunContext.in_memory(workdir=tmp_path)
    first.timer.start()
    time.sleep(0.1)
    with first.timer.paused():  # checkpoints are saved (and evaluations logged) while paused
        time.sleep(0.3)
        assert 0.09 < first.timer.elapsed() < 0.2
        first.checkpoints.save({"step": 5}, step=5)
    # The worker dies; a new process resumes from the checkpoint and trains another 0.1 s.
    second = RunContext.in_memory(workdir=tmp_path)
    second.timer.start()
    state = second.checkpoints.latest()
    assert state == {"step": 5}  # the algorithm's own state, nothing added
    time.sleep(0.1)
    second.timer.stop()
    assert 0.19 < second.timer.elapsed() < 0.35


def test_checkpoints_round_trip_and_rotate(tmp_path: Path) -> None:
    ctx = RunContext.in_memory(workdir=tmp_path)
    net = torch.nn.Linear(3, 2)
    for step in (10, 20, 30):
        ctx.checkpoints.save({"model": net.state_dict(), "step": step}, step=step)
    state = ctx.checkpoints.latest()
    assert state is not None and state["step"] == 30
    torch.testing.assert_close(state["model"]["weight"], net.weight.detach())
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2  # keeps the newest two
    assert [d for _, d in ctx.writer.artifacts] == ["checkpoints"] * 3


def test_random_streams_are_reproducible_and_independent(tmp_path: Path) -> None:
    a = RunContext.in_memory(seed=3, workdir=tmp_path)
    b = RunContext.in_memory(seed=3, workdir=tmp_path)
    c = RunContext.in_memory(seed=4, workdir=tmp_path)
    # The same seed and stream: the same numbers, whatever other streams were drawn from.
    b.rng("init").random(100)
    assert a.rng("exploration").integers(1 << 30) == b.rng("exploration").integers(1 << 30)
    assert torch.equal(
        torch.rand(4, generator=a.torch_generator("replay")),
        torch.rand(4, generator=b.torch_generator("replay")),
    )
    # Another seed, or another stream of the same seed: other numbers.
    assert not torch.equal(
        torch.rand(4, generator=a.torch_generator("replay")),
        torch.rand(4, generator=c.torch_generator("replay")),
    )
    streams = ["init", "exploration", "replay", "fixed_noise"]
    draws = [a.rng(name).random(8) for name in streams]
    assert len({tuple(d) for d in draws}) == len(streams)
    torch_draws = [torch.rand(8, generator=a.torch_generator(name)) for name in streams]
    assert len({tuple(d.tolist()) for d in torch_draws}) == len(streams)
    # Not one generator per stream seeded with the same number: the streams are uncorrelated.
    x, y = a.rng("init").random(10_000), a.rng("fixed_noise").random(10_000)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.05


def test_streams_are_spawned_from_the_seed_sequence(tmp_path: Path) -> None:
    ctx = RunContext.in_memory(seed=11, workdir=tmp_path)
    seq = stream_seed(11, "exploration")
    assert seq.entropy == 11 and len(seq.spawn_key) == 1  # a child, as SeedSequence.spawn makes
    expected = np.random.default_rng(seq).integers(1 << 40, size=5)
    assert (ctx.rng("exploration").integers(1 << 40, size=5) == expected).all()


def test_algorithms_draw_from_named_streams_only() -> None:
    # No algorithm seeds a generator with the trial's seed itself, or draws from a global RNG.
    offenders = []
    for package in ("agents", "generative"):
        for path in (Path(__file__).parents[1] / package).rglob("*.py"):
            text = path.read_text()
            for pattern in (
                "manual_seed(ctx.seed)",
                "default_rng(ctx.seed)",
                "np.random.seed(",
                "torch.manual_seed(",
                "np.random.rand",
                "torch_rng",
                "np_rng",
            ):
                if pattern in text:
                    offenders.append(f"{path.name}: {pattern}")
    assert offenders == []


def test_a_rejected_batch_fails_fast_and_blocks_nothing_after_it() -> None:
    class Refusing(InMemoryWriter):
        def write_metrics(self, points):  # type: ignore[no-untyped-def]
            if any(p.key == "bad/value" for p in points):
                raise RejectedError("MLflow refused metrics bad/value: invalid value")
            super().write_metrics(points)

    writer = Refusing()
    logger = MetricLogger(writer, max_buffer=1000, background=False)
    logger.log({"bad/value": 1.0, "good/a": 1.0}, step=0)
    with pytest.raises(RejectedError, match="bad/value"):
        logger.flush()  # raised at once: not kept for retries forever
    logger.log({"good/a": 2.0}, step=1)
    logger.flush()
    assert writer.metrics["good/a"] == [(1, 2.0)]  # later points are written


def test_a_rejection_on_the_background_thread_reaches_the_training_thread() -> None:
    class Refusing(InMemoryWriter):
        def write_metrics(self, points):  # type: ignore[no-untyped-def]
            raise RejectedError("MLflow refused metrics x/y: step out of range")

    logger = MetricLogger(Refusing(), max_buffer=1, flush_interval_s=3600)
    logger.log({"x/y": 1.0}, step=0)  # the background thread writes it, and is refused
    deadline = time.monotonic() + 5
    with pytest.raises(RejectedError, match="x/y"):
        while time.monotonic() < deadline:
            logger.log({"x/z": 1.0}, step=1)
            time.sleep(0.01)
    logger._closing.set()


def test_stop_requests(tmp_path: Path) -> None:
    ctx = RunContext.in_memory(workdir=tmp_path)
    assert not ctx.should_stop()
    ctx.request_stop()
    assert ctx.should_stop()
