"""What the service costs: one DQN trial in-process against the same spec through `rlgen run` on the
embedded Ray, and a sweep of one-CPU trials on Ray against running them one after another.

    python benchmarks/service_overhead.py [--timesteps 100000] [--trials 4]

1. The trial: `experiments/dqn_cartpole.yaml` without its early stop (~30 s of training here),
   (a) `dqn.train` called directly with an in-memory context, (b) `rlgen run` in a subprocess
   (validation, embedded Ray, MLflow on SQLite, the trial, closing). The embedded cluster's start
   and stop are measured on their own (a `ray.init`/`ray.shutdown` cycle) and reported apart; the
   overhead is (b) minus them, against (a).
2. Throughput: `--trials` seeds of a shorter trial, each reserving one CPU, through `launch` on Ray
   (as many at once as there are CPUs) against `launch(mode="local")` (one after another).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "experiments" / "dqn_cartpole.yaml"


def in_process(timesteps: int) -> float:
    import torch

    from agents import dqn
    from service.context import RunContext
    from service.spec import load_spec

    spec = load_spec(SPEC, [f"params.total_timesteps={timesteps}", "params.stop_at_return=null"])
    torch.set_num_threads(1)  # what the trial gets with num_cpus: 1
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=0, workdir=d, env=spec.env)  # type: ignore[attr-defined]
        t = time.perf_counter()
        ctx.timer.start()
        dqn.train(spec.params, ctx)  # type: ignore[attr-defined]
        ctx.close()
        return time.perf_counter() - t


def ray_start_stop() -> float:
    code = (
        "import time, ray, logging; t = time.perf_counter(); "
        "ray.init(address='local', num_cpus=2, include_dashboard=False, "
        "logging_level=logging.ERROR); ray.shutdown(); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def through_cli(timesteps: int, tmp: Path) -> tuple[float, float]:
    """Wall seconds of `rlgen run`, and the trial's own MLflow run duration."""
    args = [
        str(Path(sys.executable).parent / "rlgen"), "run", str(SPEC), "--json",
        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--set", "seeds=[0]", "--set", f"params.total_timesteps={timesteps}",
        "--set", "params.stop_at_return=null",
    ]  # fmt: skip
    t = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp, check=True)
    wall = time.perf_counter() - t
    run_id = json.loads(out.stdout)["trials"][0]["run_id"]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id)
    return wall, (run.info.end_time - run.info.start_time) / 1000


def sweep(trials: int, timesteps: int, tmp: Path) -> tuple[float, float]:
    import ray

    from service.execution import launch
    from service.spec import load_spec

    spec = load_spec(
        SPEC,
        [
            f"seeds={list(range(trials))}",
            f"params.total_timesteps={timesteps}",
            "params.stop_at_return=null",
        ],
    )
    uri = f"sqlite:///{tmp / 'sweep.db'}"
    t = time.perf_counter()
    launch(spec, mode="local", tracking_uri=uri)
    sequential = time.perf_counter() - t
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        t = time.perf_counter()
        launch(spec, mode="ray", tracking_uri=uri)
        parallel = time.perf_counter() - t
    finally:
        ray.shutdown()
    return sequential, parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=100_000, help="The single trial's.")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--sweep-timesteps", type=int, default=25_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        direct = in_process(args.timesteps)
        start_stop = ray_start_stop()
        wall, run_s = through_cli(args.timesteps, tmp)
        sequential, parallel = sweep(args.trials, args.sweep_timesteps, tmp)
    beyond = wall - start_stop
    print(f"\nDQN on CartPole, {args.timesteps:,} steps, one trial, 1 torch thread\n")
    print("| path | wall s | vs in-process |")
    print("|---|---:|---:|")
    print(f"| `dqn.train` in-process | {direct:.1f} | 1.00x |")
    print(f"| `rlgen run`, whole command | {wall:.1f} | {wall / direct:.2f}x |")
    print(f"| embedded Ray start + stop alone | {start_stop:.1f} | |")
    print(f"| `rlgen run` minus Ray start/stop | {beyond:.1f} | {beyond / direct:.3f}x |")
    print(f"| the trial's MLflow run (start to end) | {run_s:.1f} | {run_s / direct:.3f}x |")
    print(
        f"\n{args.trials} trials of {args.sweep_timesteps:,} steps, one CPU each, "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| mode | wall s | throughput vs sequential |")
    print("|---|---:|---:|")
    print(f"| one after another (`--local`) | {sequential:.1f} | 1.00x |")
    print(f"| Ray Tune, concurrent | {parallel:.1f} | {sequential / parallel:.2f}x |")


if __name__ == "__main__":
    main()
