"""Every example in experiments/ validates, and runs end to end with a tiny budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.execution import expand, launch
from service.registry import ALGORITHMS
from service.spec import load_spec

from .conftest import ROOT

EXAMPLES = sorted((ROOT / "experiments").glob("*.yaml"))

# Per algorithm, overrides that shrink the budget; the example's own structure stays as it is.
TINY: dict[str, list[str]] = {
    "value_iteration": ["params.eval_episodes=3", "params.max_iterations=200"],
    "q_learning": [
        "params.total_timesteps=2000",
        "params.eval_every=1000",
        "params.eval_episodes=5",
    ],
    "dqn": [
        "params.total_timesteps=600",
        "params.learning_starts=100",
        "params.train_freq=100",
        "params.gradient_steps=5",
        "params.eval_every=300",
        "params.eval_episodes=2",
        "params.eval_max_steps=200",  # an untrained Pong player's game lasts thousands of steps
        "params.buffer_size=1000",
    ],
    "policy_iteration": ["params.eval_episodes=3", "params.max_iterations=20"],
    "sac": [
        "params.total_timesteps=400",
        "params.learning_starts=200",
        "params.eval_every=200",
        "params.eval_episodes=2",
        "params.buffer_size=1000",
    ],
    "ppo": [
        "params.total_timesteps=512",
        "params.num_steps=64",
        "params.eval_every=256",
        "params.eval_episodes=2",
        "params.eval_max_steps=200",
    ],
    "dbn": ["params.pretraining.epochs=1", "params.finetune_epochs=1", "dataset.limit=300"],
    "autoencoder": ["params.pretrain_epochs=1", "params.epochs=1", "dataset.limit=300"],
    "vae": ["params.epochs=1", "params.iwae_k=2", "params.iwae_examples=20", "dataset.limit=300"],
    "gan": ["params.epochs=1", "dataset.limit=300"],
    "rbm": [
        "params.epochs=1",
        "params.ais.temperatures=100",
        "params.ais.runs=5",
        "params.sample_steps=5",
        "dataset.limit=300",
    ],
}


def tiny_overrides(path: Path, algorithm: str) -> list[str]:
    extra = ["env.kwargs.size=20"] if "gridworld" in path.name else []
    return [*TINY[algorithm], *extra, "seeds=[0]"]


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "value_iteration_frozenlake.yaml",
        "policy_iteration_taxi.yaml",
        "value_iteration_gridworld.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name and spec.seeds


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_a_tiny_budget(path: Path, tracking_uri: str, in_tmp: Path) -> None:
    algorithm = load_spec(path).algorithm
    assert algorithm in TINY, f"add tiny-budget overrides for {algorithm}"
    fid = []
    if algorithm in ("gan", "vae"):  # keep the FID classifier small and out of the home directory
        fid = [
            f"params.fid.cache={in_tmp}/fid",
            "params.fid.classifier_epochs=1",
            "params.fid.samples=50",
        ]
    overrides = [*tiny_overrides(path, algorithm), *fid, f"name=example-{path.stem}-{in_tmp.name}"]
    spec = load_spec(path, overrides)
    report = launch(spec, mode="local", tracking_uri=tracking_uri, spec_path=path)
    assert report.ok, [t.error for t in report.trials]
    assert len(report.trials) == (len(expand(spec)))  # one, or a sweep's configurations
    declared = ALGORITHMS[algorithm]
    for trial in report.trials:
        assert "time/train_s" in trial.metrics
        # The registry's list of what the algorithm logs (validation checks `report` and the
        # scheduler's metric against it) covers everything it did log.
        assert [k for k in trial.metrics if not declared.logs(k)] == []
        assert any(key.startswith("eval/") for key in trial.metrics)
        assert MlflowClient(tracking_uri).get_run(trial.run_id).info.status == "FINISHED"
