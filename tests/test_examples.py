"""Every example in experiments/ validates, and runs end to end with a tiny budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmarks.tiny import TINY, tiny_overrides
from service.execution import expand, launch
from service.registry import ALGORITHMS
from service.spec import load_spec

from .conftest import ROOT

EXAMPLES = sorted((ROOT / "experiments").glob("*.yaml"))


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
