"""Metric-logging overhead of real trials against MLflow on SQLite (the embedded default).

Each workload runs in the same process with three writers behind `RunContext`: one that drops
everything, and the two paths a metric takes to MLflow (see `service.tracking`): on the embedded
cluster, through the driver's relay (served here by a separate process, as the driver is), and on
a cluster, MLflow in the trial's own process, on the logger's background thread. The overhead is
the difference in wall time relative to the no-op run (best of `--repeats`). This counts
everything: buffering, pickling, the batched `log_batch` writes, and any contention they cause.
Goal: under 2%. For contrast, the last column is what one `log_metric` call per point would add.

Workloads: value iteration on a 300x300 gridworld (one `solver/bellman_residual` point per sweep),
and a DQN-sized training loop (64x8 -> 256 -> 256 -> 2 MLP update per step) logging 6 metrics every
10 steps.

    python benchmarks/logging_overhead.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents import value_iteration
from agents.envs import EnvSpec
from runctx import RunContext
from service.relay import RelayTracker
from service.store import client_for, ensure_experiment
from service.tracking import RunWriter, Tracker

# The driver's side of the embedded path, in a process of its own: prints the socket's path,
# serves until its stdin closes.
RELAY = """
import sys
from service.relay import Relay
with Relay(sys.argv[1]) as relay:
    print(relay.address, flush=True)
    sys.stdin.read()
"""

GRID = EnvSpec(id="rlgen/GridWorld-v0", kwargs={"size": 300, "slip": 0.2, "seed": 0})


class NullWriter:
    def write_metrics(self, points: Any) -> None:
        pass

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        pass

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        pass


def timed(workload: Callable[[RunContext], None], writer: Any, workdir: Path) -> float:
    ctx = RunContext(seed=0, writer=writer, workdir=workdir, env=GRID)
    t = time.perf_counter()
    workload(ctx)
    ctx.close()  # the final flush is part of the trial
    return time.perf_counter() - t


def synthetic_training(ctx: RunContext, steps: int) -> None:
    """A DQN-sized update per step (a 64x(256x256) MLP forward and backward), 6 metrics / 10 steps."""
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 2),
    )
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.randn(64, 8, generator=ctx.torch_generator("data"))
    for step in range(steps):
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            ctx.log_metrics(
                {
                    "losses/td_loss": loss,
                    "losses/q_values": 0.5,
                    "charts/epsilon": 0.1,
                    "charts/episodic_return": 10.0,
                    "charts/episodic_length": 10.0,
                    "time/sps": 1000.0,
                },
                step=step,
            )


def value_iteration_trial(ctx: RunContext) -> None:
    value_iteration.train(value_iteration.Config(eval_episodes=5, figures=False), ctx)


def long_value_iteration_trial(ctx: RunContext) -> None:
    ctx.env = EnvSpec(id="rlgen/GridWorld-v0", kwargs={"size": 600, "slip": 0.2, "seed": 0})
    value_iteration_trial(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20_000, help="training-loop steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core computes, the other is free for the writer thread
    workloads = [
        ("value iteration, 300x300 gridworld (short)", value_iteration_trial, 1902),
        ("value iteration, 600x600 gridworld", long_value_iteration_trial, 1902),
        (
            "training loop, 6 metrics / 10 steps",
            lambda c: synthetic_training(c, args.steps),
            6 * args.steps // 10,
        ),
    ]
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        client = client_for(uri)
        exp = ensure_experiment(client, "logging-overhead", uri)
        relay = subprocess.Popen(
            [sys.executable, "-c", RELAY, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert relay.stdout is not None and relay.stdin is not None
        address = relay.stdout.readline().strip()
        rows = []
        for name, workload, points in workloads:
            null_s, direct_s, relayed_s = [], [], []
            for rep in range(args.repeats):
                null_s.append(timed(workload, NullWriter(), Path(d) / f"n{rep}"))
                run_id = client.create_run(exp).info.run_id
                writer = RunWriter(Tracker(client), run_id)
                direct_s.append(timed(workload, writer, Path(d) / f"t{rep}"))
                run_id = client.create_run(exp).info.run_id
                tracker = RelayTracker(address)
                relayed_s.append(timed(workload, RunWriter(tracker, run_id), Path(d) / f"p{rep}"))
                tracker.close()
                history = client.get_metric_history(
                    run_id, next(iter(client.get_run(run_id).data.metrics))
                )
                assert history, "nothing reached MLflow"
            rows.append((name, points, min(null_s), min(relayed_s), min(direct_s)))
        relay.stdin.close()
        relay.wait()

        # Contrast: what one `log_metric` call per point would cost.
        run_id = client.create_run(exp).info.run_id
        t = time.perf_counter()
        for i in range(200):
            client.log_metric(run_id, "x/y", float(i), step=i)
        per_call = (time.perf_counter() - t) / 200

    print(
        "| trial | metric points | no-op writer s | embedded: via the relay s | overhead | "
        "cluster: MLflow in-process | unbuffered log_metric would add |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, points, null, relayed, direct in rows:
        print(
            f"| {name} | {points:,} | {null:.2f} | {relayed:.2f} | {(relayed - null) / null:+.1%} | "
            f"{(direct - null) / null:+.1%} | {points * per_call:.1f} s |"
        )


if __name__ == "__main__":
    main()
