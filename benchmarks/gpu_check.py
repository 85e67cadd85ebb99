"""One GPU check: every example spec on the GPU at a tiny budget, and the throughput of the
GPU-bound workloads on the GPU against the same code on the CPU, in float32 and bf16-mixed.

Runs the algorithms in this process through the in-memory run context: no Ray, no MLflow, no
network. Besides Python 3.12 with PyTorch, NumPy and SciPy, it needs these wheels (about 41 MB;
`bash benchmarks/gpu_wheels.sh DIR` downloads them on a machine with the package index):

    gymnasium cloudpickle farama-notifications typing-extensions pydantic pydantic-core
    annotated-types typing-inspection pydantic-settings python-dotenv pyyaml
    scikit-learn joblib threadpoolctl (the digits data set)
    matplotlib pillow kiwisolver fonttools contourpy cycler pyparsing python-dateutil six
    packaging (figures)
    ale-py minatar (the Atari and MinAtar examples)

On the GPU machine, from the repository's root:

    pip install --no-index --no-deps --target /tmp/site DIR/*.whl
    PYTHONPATH=$PWD:/tmp/site python benchmarks/gpu_check.py [--write-readme]

About 8 minutes on one GPU. `--device cpu --quick` runs the same code on the CPU with tiny
sizes (the test suite does, so the script does not rot). Prints two tables; `--write-readme`
also puts them, dated and with the GPU's name, into benchmarks/README.md.

Throughput: transitions per second for DQN (CartPole with the example's MLP; Pong with the
Nature CNN, an update every 4 steps, batch 32), training examples per second for the VAE, GAN
and RBM (digits, the examples' networks), Bellman sweeps per second for value iteration on a
10^6-state gridworld. Wall time of `train()` on a fixed budget, evaluation kept small.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout that is not pip-installed

from agents import value_iteration  # noqa: E402
from agents.gridworld import GridWorldEnv  # noqa: E402
from benchmarks.tiny import tiny_overrides  # noqa: E402
from runctx import RunContext  # noqa: E402
from service.registry import ALGORITHMS  # noqa: E402
from service.spec import SpecBase, load_spec  # noqa: E402

EXAMPLES = ROOT / "experiments"
MARK = "<!-- gpu_check -->"


def train(spec: SpecBase, device: str, workdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The spec's first seed, in this process; returns the metrics it logged."""
    ctx = RunContext.in_memory(
        seed=spec.seeds[0],
        workdir=workdir,
        env=getattr(spec, "env", None),
        dataset=getattr(spec, "dataset", None),
        device=device,
    )
    ALGORITHMS[spec.algorithm].train(spec.params, ctx)
    ctx.close()
    return ctx.writer.metrics  # type: ignore[attr-defined, no-any-return]


def check_examples(device: str, pattern: str, tmp: Path) -> list[list[str]]:
    rows = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if not re.search(pattern, path.stem):
            continue
        algorithm = load_spec(path).algorithm
        fid = []
        if algorithm in ("gan", "vae"):  # a small FID classifier, cached in the temp dir
            fid = [f"params.fid.cache={tmp}/fid", "params.fid.classifier_epochs=1"]
            fid.append("params.fid.samples=50")
        spec = load_spec(path, [*tiny_overrides(path, algorithm), *fid])
        t = time.perf_counter()
        try:
            metrics = train(spec, device, tmp / path.stem)
            values = [v for points in metrics.values() for _, v in points]
            bad = [k for k, pts in metrics.items() if not all(math.isfinite(v) for _, v in pts)]
            status = "FINISHED" if not bad else f"non-finite {bad[0]}"
            logged = str(len(values))
        except Exception as e:  # the table says which example failed and why; the rest go on
            status, logged = f"FAILED: {type(e).__name__}: {str(e)[:80]}", "-"
        rows.append([path.name, algorithm, status, logged, f"{time.perf_counter() - t:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


# -- throughput ----------------------------------------------------------------------------------
# Each workload: (name, unit, what runs (device, precision, quick) -> (units done, seconds),
# whether it takes `precision`).
def _example_run(
    name: str, overrides: list[str], units: Callable[[SpecBase], float]
) -> Callable[[str, str, bool, Path], tuple[float, float]]:
    def run(device: str, precision: str, quick: bool, tmp: Path) -> tuple[float, float]:
        extra = [f"params.precision={precision}"] if precision != "-" else []
        spec = load_spec(EXAMPLES / name, [*overrides_for(overrides, quick), *extra, "seeds=[0]"])
        t = time.perf_counter()
        train(spec, device, tmp / f"{name}-{device}-{precision}")
        if device == "cuda":
            torch.cuda.synchronize()
        return units(spec), time.perf_counter() - t

    return run


def overrides_for(overrides: list[str], quick: bool) -> list[str]:
    """`key=full|quick` entries pick the value for the mode; the rest are taken as they are."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        full, _, small = value.partition("|")
        out.append(f"{key}={small if quick and small else full}")
    return out


DQN_FAST = ["params.eval_every=10000000", "params.eval_episodes=1", "params.stop_at_return=null"]
GENERATIVE = ["params.figures=false", "dataset.limit=null|300"]
WORKLOADS = [
    (
        "DQN CartPole (MLP)",
        "steps/s",
        _example_run(
            "dqn_cartpole.yaml",
            ["params.total_timesteps=20000|600", "params.learning_starts=1000|100", *DQN_FAST],
            lambda s: s.params.total_timesteps,  # type: ignore[attr-defined]
        ),
        True,
    ),
    (
        "DQN Pong (Nature CNN)",
        "steps/s",
        _example_run(
            "dqn_pong.yaml",
            [
                "params.total_timesteps=8000|300",
                "params.learning_starts=1000|100",
                "params.buffer_size=20000|1000",
                "params.eval_max_steps=50",
                *DQN_FAST,
            ],
            lambda s: s.params.total_timesteps,  # type: ignore[attr-defined]
        ),
        True,
    ),
    (
        "VAE conv (digits)",
        "examples/s",
        _example_run(
            "vae_conv_digits.yaml",
            [
                "params.epochs=5|1",
                "params.fid.enabled=false",
                "params.iwae_examples=50",
                *GENERATIVE,
            ],
            lambda s: s.params.epochs * train_size(s),  # type: ignore[attr-defined]
        ),
        True,
    ),
    (
        "DCGAN (digits)",
        "examples/s",
        _example_run(
            "dcgan_digits.yaml",
            ["params.epochs=5|1", "params.fid.enabled=false", *GENERATIVE],
            lambda s: s.params.epochs * train_size(s),  # type: ignore[attr-defined]
        ),
        True,
    ),
    (
        "RBM CD-1 (digits)",
        "examples/s",
        _example_run(
            "rbm_digits.yaml",
            [
                "params.epochs=10|1",
                "params.ais.enabled=false",
                "params.probe=false",
                *GENERATIVE,
            ],
            lambda s: s.params.epochs * train_size(s),  # type: ignore[attr-defined]
        ),
        False,
    ),
]


def train_size(spec: SpecBase) -> int:
    from generative import data

    return len(data.load(spec.dataset, spec.seeds[0]).x_train)  # type: ignore[attr-defined]


def value_iteration_sweeps(device: str, side: int, sweeps: int) -> tuple[float, float]:
    """Bellman sweeps a second on a side x side gridworld (float32)."""
    model = GridWorldEnv(size=side, slip=0.2, obstacle_density=0.1, seed=0).transition_model()
    mdp = model.to_torch(torch.device(device), torch.float32)
    value_iteration.solve(mdp, 0.99, 0.0, 2)  # warm-up: kernels, allocations
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    solution = value_iteration.solve(mdp, 0.99, 0.0, sweeps)  # epsilon 0: exactly `sweeps`
    if device == "cuda":
        torch.cuda.synchronize()
    return len(solution.residuals), time.perf_counter() - t


def throughput(device: str, quick: bool, tmp: Path) -> list[list[str]]:
    rows = []
    for name, unit, run, has_precision in WORKLOADS:
        for precision in ("fp32", "bf16-mixed") if has_precision else ("-",):
            rates = {}
            for where in ("cpu", device):
                if where in rates:
                    continue
                done, seconds = run(where, precision, quick, tmp)
                rates[where] = done / seconds
            rows.append(table_row(name, precision, unit, rates, device))
            print(" | ".join(rows[-1]), flush=True)
    side = 100 if quick else 1000
    rates = {}
    for where in ("cpu", device):
        if where not in rates:
            done, seconds = value_iteration_sweeps(where, side, 5 if quick else 30)
            rates[where] = done / seconds
    rows.append(
        table_row(f"Value iteration, {side * side:,} states", "fp32", "sweeps/s", rates, device)
    )
    print(" | ".join(rows[-1]), flush=True)
    return rows


def table_row(name: str, precision: str, unit: str, rates: dict, device: str) -> list[str]:
    cpu, other = rates["cpu"], rates[device]
    return [name, precision, unit, f"{cpu:,.0f}", f"{other:,.0f}", f"{other / cpu:.2f}x"]


def cpu_name() -> str:
    """The CPU's model name (Linux), or what Python knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--examples", default=".", help="regex on example names ('' for none)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument(
        "--write-readme",
        nargs="?",
        const=ROOT / "benchmarks" / "README.md",
        type=Path,
        help="put the tables into this file's GPU check section (default benchmarks/README.md)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --device cpu runs the check on the CPU")
    torch.set_num_threads(os.cpu_count() or 1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"# {name}, torch {torch.__version__}, {os.cpu_count()} CPU threads", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        examples = check_examples(args.device, args.examples, tmp) if args.examples else []
        speed = [] if args.no_throughput else throughput(args.device, args.quick, tmp)
    out = [f"{datetime.date.today()}, {name}, torch {torch.__version__}:", ""]
    if examples:
        header = ["example", "algorithm", f"on {args.device}", "points", "s"]
        out += [markdown(header, examples), ""]
    if speed:
        header = ["workload", "precision", "unit", "CPU", args.device.upper(), "ratio"]
        out += [markdown(header, speed), ""]
    text = "\n".join(out)
    print(text)
    failed = [r for r in examples if r[2] != "FINISHED"]
    if args.write_readme:
        readme = args.write_readme
        current = readme.read_text()
        section = f"{MARK}\n## GPU check (`benchmarks/gpu_check.py`)\n\n{text}\n{MARK}\n"
        if MARK in current:
            start, end = current.index(MARK), current.rindex(MARK) + len(MARK) + 1
            current = current[:start] + section + current[end:]
        else:
            current = current.rstrip() + "\n\n" + section
        readme.write_text(current)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
