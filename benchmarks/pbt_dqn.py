"""Population-based training against the same trials without it, in one run.

    python benchmarks/pbt_dqn.py [--timesteps 30000] [--members 4] [--rounds 1]

Both arms start from the same `--members` step sizes (the PBT spec's draws, see
`experiments/pbt_dqn_cartpole.yaml`) and spend the same budget: `--members` trials of
`--timesteps` each, one CPU per trial, on the embedded Ray cluster. The random arm is that sweep
as a grid of those step sizes with no scheduler, i.e. random search; the PBT arm lets the worst
quarter copy the best quarter's checkpoint every `perturbation_interval` steps and perturb its
step size. Reported per arm: the best member's and the median member's final evaluation (mean
return of 10 greedy episodes at the last step), the mean over members of each member's evaluation
curve (its area, per evaluation), and the wall-clock seconds. With `--rounds` > 1 the arms
alternate in order and medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "experiments" / "pbt_dqn_cartpole.yaml"


def arm(name: str, timesteps: int, members: int, pbt: bool, uri: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from service.execution import launch
    from service.spec import load_spec
    from service.sweeps import expand

    interval = max(timesteps // 6, 1)
    common = [
        f"name={name}",
        f"params.total_timesteps={timesteps}",
        f"params.eval_every={interval // 2}",
        f"params.checkpoint_every={interval // 2}",
        f"sweep.num_samples={members}",
        f"sweep.scheduler.perturbation_interval={interval}",
    ]
    spec = load_spec(SPEC, common)
    if not pbt:  # the same starting points, as a plain sweep
        values = [t.overrides["learning_rate"] for t in expand(spec)]
        spec = load_spec(
            SPEC,
            [
                *common[:4],
                f"sweep={{params: {{learning_rate: {{grid: {values}}}}}}}",
            ],
        )
    t0 = time.perf_counter()
    result = launch(spec, mode="ray", tracking_uri=uri)
    seconds = time.perf_counter() - t0
    assert result.ok, [(t.label, t.status, t.error) for t in result.trials]
    client = MlflowClient(uri)
    finals, areas, exploits = [], [], 0
    for trial in result.trials:
        tags = client.get_run(trial.run_id).data.tags
        exploits += len(tags.get("rlgen.pbt.exploits", "").splitlines())
        curve = sorted(
            (m.step, m.value) for m in client.get_metric_history(trial.run_id, "eval/return_mean")
        )
        finals.append(curve[-1][1])
        areas.append(statistics.fmean(v for _, v in curve))
    return {
        "best final": max(finals),
        "median final": statistics.median(finals),
        "mean curve": statistics.fmean(areas),
        "exploits": exploits,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timesteps", type=int, default=30_000)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    import ray

    from service.cluster import start_ray

    start_ray()
    results: dict[str, list[dict[str, float]]] = {"random search": [], "PBT": []}
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        for r in range(args.rounds):
            order = [("random search", False), ("PBT", True)]
            for label, pbt in order if r % 2 == 0 else order[::-1]:
                # One name per round for both arms: the PBT spec's draws (which the random
                # arm's grid repeats) depend on it.
                results[label].append(arm(f"bench-pbt-{r}", args.timesteps, args.members, pbt, uri))
    ray.shutdown()
    keys = ["best final", "median final", "mean curve", "exploits", "seconds"]
    print(
        f"DQN CartPole-v1, {args.members} members x {args.timesteps} timesteps, "
        f"{args.rounds} round(s) (medians)"
    )
    print("| arm | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, rounds in results.items():
        cells = [f"{statistics.median(r[k] for r in rounds):.1f}" for k in keys]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
