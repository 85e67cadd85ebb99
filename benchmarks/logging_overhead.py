"""Metric-logging overhead of real trials against MLflow on SQLite (the embedded default).

Each workload runs in the same process with three writers behind `RunContext`: one that drops
everything, the service's (batches go to a helper process that writes them to MLflow), and a plain
in-process MLflow writer on the logger's background thread. The overhead is the difference in wall
time relative to the no-op run (best of `--repeats`). This counts everything: buffering, pickling,
the batched `log_batch` writes, and any contention they cause.
Goal: under 2%. For contrast, the last column is what one `log_metric` call per point would add.

Workloads: value iteration on a 300x300 gridworld (one `solver/bellman_residual` point per sweep),
and a DQN-sized training loop (64x8 -> 256 -> 256 -> 2 MLP update per step) logging 6 metrics every
10 steps.

    python benchmarks/logging_overhead.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents import value_iteration
from service.context import EnvSpec, RunContext
from service.metric_writer import ProcessWriter
from service.tracking import MlflowWriter, client_for, ensure_experiment

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
    x = torch.randn(64, 8, generator=ctx.torch_rng)
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
        rows = []
        for name, workload, points in workloads:
            null_s, thread_s, process_s = [], [], []
            for rep in range(args.repeats):
                null_s.append(timed(workload, NullWriter(), Path(d) / f"n{rep}"))
                run_id = client.create_run(exp).info.run_id
                thread_s.append(timed(workload, MlflowWriter(client, run_id), Path(d) / f"t{rep}"))
                run_id = client.create_run(exp).info.run_id
                writer = ProcessWriter(client, uri, run_id)
                process_s.append(timed(workload, writer, Path(d) / f"p{rep}"))
                writer.close()
                history = client.get_metric_history(
                    run_id, next(iter(client.get_run(run_id).data.metrics))
                )
                assert history, "nothing reached MLflow"
            rows.append((name, points, min(null_s), min(thread_s), min(process_s)))

        # Contrast: what one `log_metric` call per point would cost.
        run_id = client.create_run(exp).info.run_id
        t = time.perf_counter()
        for i in range(200):
            client.log_metric(run_id, "x/y", float(i), step=i)
        per_call = (time.perf_counter() - t) / 200

    print(
        "| trial | metric points | no-op writer s | rlgen (writer process) s | overhead | "
        "in-process writer thread | unbuffered log_metric would add |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, points, null, thread, process in rows:
        print(
            f"| {name} | {points:,} | {null:.2f} | {process:.2f} | {(process - null) / null:+.1%} | "
            f"{(thread - null) / null:+.1%} | {points * per_call:.1f} s |"
        )


if __name__ == "__main__":
    main()
