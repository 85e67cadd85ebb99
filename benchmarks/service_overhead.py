"""What the service costs: one DQN trial in-process, through `rlgen run` on the embedded Ray, and
through the HTTP API on a running service; and a sweep of one-CPU trials on Ray against running
them one after another.

    python benchmarks/service_overhead.py [--trial-seconds 30 | --timesteps N] [--trials 4]
                                          [--rounds 3] [--no-api]

1. The trial: `experiments/dqn_cartpole.yaml` without its early stop, sized to take about
   `--trial-seconds` (the issue's ~30 s) in-process on this machine;
   (a) `dqn.train` called directly with an in-memory context, warm (in this process, which has
   imported everything and trained before); (a') the same call as a script: a fresh Python that
   imports the algorithm, calls it and exits, end to end, as `python dqn.py` runs a CleanRL
   script; (b) `rlgen run` in a subprocess (validation, embedded Ray, MLflow on SQLite, the trial,
   closing). The embedded cluster's start and stop are measured on their own (a
   `start_ray`/`ray.shutdown` cycle of the same cluster) and reported apart; the overhead is
   (b) minus them, against (a) and (a'). (c) The same spec POSTed to `rlgen serve` in front of
   a running `ray start --head` cluster (2 CPUs), timed from the POST until the API reports the
   job SUCCEEDED (polled every 0.2 s): a Ray Job whose driver is `rlgen run --address auto`.
2. Throughput: `--trials` seeds of the same trial, each reserving one CPU, on Ray (as many at
   once as there are CPUs, as Ray tasks) against one after another in-process; measured twice:
   (a) `launch` called in this (already warm) process, the embedded cluster started beforehand;
   (b) as a user runs them, `rlgen run --local` against `rlgen run` minus the embedded cluster's
   start and stop, the same method as for the single trial. The ceiling: as many warm trainings
   as there are CPUs in plain processes at the same moment (no Ray, no MLflow), against one
   alone: what this machine itself gives for running trials side by side (two vCPUs of a VM can
   slow each other by much more than two cores do), and each sweep's share of it.

The tracking stores exist beforehand, as after a user's first run (a new store's tables take
~0.8 s to create, once). This shared host is noisy (+-5% between identical runs), so every
measurement is repeated in `--rounds` alternating rounds and each ratio is the median of the
rounds' ratios, with their range.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "experiments" / "dqn_cartpole.yaml"


def in_process(timesteps: int) -> float:
    import torch

    from agents import dqn
    from runctx import RunContext
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


# The trial in a fresh Python, without Ray or rlgen's service: argv = spec, timesteps, and a
# wall-clock time to start at ("-": at once, cold, as a script runs it; else: warmed up first, so
# that processes started together train together). Prints the seconds of `dqn.train`.
SCRIPT = """
import os, sys, tempfile, time
import torch
torch.set_num_threads(1)
from agents import dqn
from runctx import RunContext
from service.spec import load_spec

def train(timesteps):
    spec = load_spec(sys.argv[1], [f"params.total_timesteps={timesteps}", "params.stop_at_return=null"])
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=0, workdir=d, env=spec.env)
        t = time.perf_counter()
        ctx.timer.start()
        dqn.train(spec.params, ctx)
        ctx.close()
        return time.perf_counter() - t

if sys.argv[3] != "-":
    train(2000)
    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
print(train(int(sys.argv[2])), flush=True)
"""


def _script(timesteps: int, start_at: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(SPEC), str(timesteps), start_at], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def as_script(timesteps: int) -> float:
    """Wall seconds of a fresh Python that imports the algorithm, calls `dqn.train` (as
    `in_process` does) and exits at once: the trial as a script runs it, end to end, paying
    torch's one-time imports (torch, TorchDynamo at the first optimizer step) as every new
    process does."""
    t = time.perf_counter()
    proc = _script(timesteps, "-")
    proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the script failed ({proc.returncode})")
    return time.perf_counter() - t


def side_by_side(timesteps: int, count: int) -> float:
    """Seconds of the slowest of `count` warm `dqn.train` calls made at the same moment in as
    many plain processes (no Ray, no MLflow): what this machine itself loses running trials side
    by side, the ceiling of any sweep's throughput here."""
    start_at = time.time() + 10  # after every process has imported and warmed up
    procs = [_script(timesteps, str(start_at)) for _ in range(count)]
    times = [float(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    return max(times)


def ray_start_stop() -> float:
    """Seconds to start and stop the embedded cluster `rlgen run` starts, with no work."""
    code = (
        "import time, ray\nfrom service.cluster import start_ray\n"
        "t = time.perf_counter()\nstart_ray()\nray.shutdown()\nprint(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return float(out.stdout.strip().splitlines()[-1])


def through_cli(
    timesteps: int, tmp: Path, seeds: int = 1, local: bool = False
) -> tuple[float, float]:
    """Wall seconds of `rlgen run` (`--local`: in-process, one trial after another) with `seeds`
    trials, and the first trial's own MLflow run duration."""
    args = [
        str(Path(sys.executable).parent / "rlgen"), "run", str(SPEC), "--json",
        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--set", f"seeds={list(range(seeds))}", "--set", f"params.total_timesteps={timesteps}",
        "--set", "params.stop_at_return=null", *(["--local"] if local else []),
    ]  # fmt: skip
    t = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp, check=True)
    wall = time.perf_counter() - t
    run_id = json.loads(out.stdout)["trials"][0]["run_id"]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id)
    return wall, (run.info.end_time - run.info.start_time) / 1000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(method: str, url: str, token: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/yaml")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def through_api(timesteps: int, tmp: Path) -> tuple[float, float]:
    """Seconds from POST /experiments to SUCCEEDED on a running service and cluster, and the
    trial's own MLflow run duration."""
    token, bindir = secrets.token_hex(16), Path(sys.executable).parent
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RLGEN_API_TOKEN": token,
        # The job's driver is `rlgen run`: found on PATH, also when this venv is not activated.
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash, api = _free_port(), _free_port(), _free_port()
    uri = f"sqlite:///{tmp / 'api-mlflow.db'}"

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    procs = [
        spawn(str(bindir / "ray"), "start", "--head", "--block", f"--port={gcs}",
              f"--dashboard-port={dash}", "--include-dashboard=true",
              "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats")
    ]  # fmt: skip
    from service.spec import load_spec, to_yaml

    spec = load_spec(
        SPEC, ["seeds=[0]", f"params.total_timesteps={timesteps}", "params.stop_at_return=null"]
    )
    base = f"http://127.0.0.1:{api}"
    try:
        deadline = time.monotonic() + 120
        while _http("GET", f"http://127.0.0.1:{dash}/api/version", token)[0] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray head's dashboard never came up")
            time.sleep(0.5)
        procs.append(
            spawn(str(bindir / "rlgen"), "serve", "--address", f"http://127.0.0.1:{dash}",
                  "--tracking-uri", uri, "--port", str(api), "--db", str(tmp / "api.db"))
        )  # fmt: skip
        while True:  # until the service and the head's job agent are up (503 meanwhile)
            t = time.perf_counter()
            status, body = _http("POST", f"{base}/experiments", token, to_yaml(spec).encode())
            if status == 202:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service never accepted the experiment: {body}")
            time.sleep(0.5)
        while True:
            detail = _http("GET", f"{base}/experiments/{body['id']}", token)[1]
            if detail["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                wall = time.perf_counter() - t
                break
            time.sleep(0.2)
        if detail["status"] != "SUCCEEDED":
            raise RuntimeError(f"the job ended {detail['status']}: {detail.get('message')}")
        from mlflow.tracking import MlflowClient

        run = MlflowClient(uri).get_run(detail["runs"][0]["run_id"])
        return wall, (run.info.end_time - run.info.start_time) / 1000
    finally:
        for proc in procs:  # `ray start --block` stops the cluster's processes on SIGTERM
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)


def sweep(trials: int, timesteps: int, tmp: Path) -> tuple[float, float]:
    import ray

    from service.cluster import start_ray
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
    start_ray()  # the embedded cluster `rlgen run` starts: every CPU of this machine
    try:
        t = time.perf_counter()
        launch(spec, mode="ray", tracking_uri=uri)
        parallel = time.perf_counter() - t
    finally:
        ray.shutdown()
    return sequential, parallel


def calibrate(seconds: float) -> int:
    """Timesteps of a trial that takes about `seconds` in-process here (the issue's ~30 s),
    timed warm (see `main`)."""
    probe = 20_000
    return max(probe, round(seconds / in_process(probe) * probe / 5_000) * 5_000)


def create_store(db: Path) -> None:
    """An existing tracking store, as after a user's first run: creating a fresh store's tables
    (~0.8 s) happens once per store, not once per experiment."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)


def median_ratio(rounds: list[dict[str, float]], num: str, den: str) -> str:
    ratios = [r[num] / r[den] for r in rounds]
    spread = f" ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else ""
    return f"{np.median(ratios):.3f}x{spread}"


def median(rounds: list[dict[str, float]], key: str) -> float:
    return float(np.median([r[key] for r in rounds]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timesteps", type=int, default=None, help="Each trial's (default: --trial-seconds)."
    )
    parser.add_argument(
        "--trial-seconds", type=float, default=30.0,
        help="Size the trial to take about this long in-process on this machine.",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="Rounds of every measurement in turn; ratios are each round's, then the median.",
    )  # fmt: skip
    parser.add_argument("--no-api", action="store_true", help="Skip the HTTP API path.")
    parser.add_argument("--no-sweep", action="store_true", help="Skip the sweep (part 2).")
    args = parser.parse_args()
    # Warm: a first call also pays torch's one-time imports (TorchDynamo at the first optimizer
    # step, ~1 s), which the in-process rows are meant to leave out (the script's row has them).
    in_process(2_000)
    timesteps = args.timesteps or calibrate(args.trial_seconds)
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for db in ("mlflow.db", "api-mlflow.db", "sweep.db"):
            create_store(tmp / db)
        for _ in range(args.rounds):
            r: dict[str, float] = {
                "direct": in_process(timesteps),
                "script": as_script(timesteps),
                "start_stop": ray_start_stop(),
            }
            r["wall"], r["run_s"] = through_cli(timesteps, tmp)
            r["beyond"] = r["wall"] - r["start_stop"]
            if not args.no_api:
                r["api_wall"], r["api_run_s"] = through_api(timesteps, tmp)
            if not args.no_sweep:
                cpus = os.cpu_count() or 1
                r["side_by_side"] = side_by_side(timesteps, cpus)
                r["ceiling"] = cpus * r["direct"] / r["side_by_side"]
                r["sequential"], r["parallel"] = sweep(args.trials, timesteps, tmp)
                r["cli_sequential"] = through_cli(timesteps, tmp, args.trials, local=True)[0]
                r["cli_parallel"] = through_cli(timesteps, tmp, args.trials)[0] - r["start_stop"]
            rounds.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(
        f"\nDQN on CartPole, {timesteps:,} steps, one trial, 1 torch thread; median of "
        f"{args.rounds} rounds (range)\n"
    )
    print("| path | wall s | vs in-process call | vs the script |")
    print("|---|---:|---:|---:|")
    print(f"| `dqn.train` in-process (warm) | {median(rounds, 'direct'):.1f} | 1.00x | |")
    print(
        f"| the same call as a script (fresh Python) | {median(rounds, 'script'):.1f} "
        f"| {median_ratio(rounds, 'script', 'direct')} | 1.00x |"
    )
    rows = [
        ("`rlgen run`, whole command", "wall"),
        ("`rlgen run` minus Ray start/stop", "beyond"),
        ("the trial's MLflow run (start to end)", "run_s"),
    ]
    if not args.no_api:
        rows += [
            ("HTTP API: POST to SUCCEEDED", "api_wall"),
            ("HTTP API: the trial's MLflow run", "api_run_s"),
        ]
    for label, key in rows:
        print(
            f"| {label} | {median(rounds, key):.1f} | {median_ratio(rounds, key, 'direct')} "
            f"| {median_ratio(rounds, key, 'script')} |"
        )
    print(f"| embedded Ray start + stop alone | {median(rounds, 'start_stop'):.1f} | | |")
    if args.no_sweep:
        return
    print(f"\n{args.trials} trials of {timesteps:,} steps, one CPU each, {os.cpu_count()} CPUs\n")
    for r in rounds:  # the ratios' share of what the machine allows, round by round
        r["of_ceiling"] = r["sequential"] / r["parallel"] / r["ceiling"]
        r["cli_of_ceiling"] = r["cli_sequential"] / r["cli_parallel"] / r["ceiling"]
    print("| mode | wall s | throughput vs sequential | share of the ceiling |")
    print("|---|---:|---:|---:|")
    print(
        f"| plain processes, {os.cpu_count()} trainings side by side (the ceiling) "
        f"| {median(rounds, 'side_by_side'):.1f} | {median(rounds, 'ceiling'):.3f}x "
        f"({min(r['ceiling'] for r in rounds):.3f}-{max(r['ceiling'] for r in rounds):.3f}) | |"
    )
    print(f"| `launch`, one after another (local) | {median(rounds, 'sequential'):.1f} | 1.00x | |")
    print(
        f"| `launch`, on Ray, concurrent | {median(rounds, 'parallel'):.1f} "
        f"| {median_ratio(rounds, 'sequential', 'parallel')} "
        f"| {median(rounds, 'of_ceiling'):.0%} |"
    )
    print(
        f"| `rlgen run --local`, one after another | {median(rounds, 'cli_sequential'):.1f} "
        "| 1.00x | |"
    )
    print(
        f"| `rlgen run`, on Ray, concurrent, minus Ray start/stop "
        f"| {median(rounds, 'cli_parallel'):.1f} "
        f"| {median_ratio(rounds, 'cli_sequential', 'cli_parallel')} "
        f"| {median(rounds, 'cli_of_ceiling'):.0%} |"
    )


if __name__ == "__main__":
    main()
