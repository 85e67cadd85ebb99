"""Runs that start from other runs: `rlgen continue` (same trajectory, a larger budget, a new
linked run) and `rlgen run --init-from` (another run's weights), through the CLI and the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from service.tracking import TAG_CONTINUED_FROM, TAG_INIT_FROM

from . import test_api
from .test_api import AUTH
from .test_cli import rlgen, run_json

api = test_api.api  # the API with in-process jobs (a fixture)

VAE = """\
name: {name}
algorithm: vae
seeds: {seeds}
params:
  hidden: [{hidden}]
  latent_dim: 4
  epochs: {epochs}
  figures: false
  iwae_k: 4
  iwae_examples: 50
  fid: {{enabled: false}}
"""


def write_spec(tmp: Path, name: str, *, epochs: int, hidden: int = 32, seeds: str = "[0]") -> str:
    path = tmp / f"vae-{hidden}-{epochs}-{len(seeds)}.yaml"
    path.write_text(VAE.format(name=name, epochs=epochs, hidden=hidden, seeds=seeds))
    return str(path)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def runs_in(client: MlflowClient, name: str) -> int:
    experiment = client.get_experiment_by_name(name)
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


def test_continue_goes_on_as_the_longer_run_in_a_linked_run(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    """2 epochs, continued to 4, log what one 4-epoch run logs at epochs 3 and 4."""
    store = ["--local", "--tracking-uri", tracking_uri]
    short = run_json(write_spec(in_tmp, experiment_name, epochs=2), *store)["trials"][0]
    long = run_json(write_spec(in_tmp, experiment_name, epochs=4), *store)["trials"][0]
    code, out, err = rlgen(
        "continue", short["run_id"], "--set", "params.epochs=4", *store, "--json"
    )
    assert code == 0, err
    cont = json.loads(out)["trials"][0]
    client = MlflowClient(tracking_uri)
    run = client.get_run(cont["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_CONTINUED_FROM] == short["run_id"]
    assert run.data.params["continue_from"] == short["run_id"]
    assert run.data.params["params.epochs"] == "4"
    for key in ("eval/neg_elbo", "train/loss", "eval/nll_iwae"):
        steps = history(client, cont["run_id"], key)
        assert [s for s, _ in steps] == [3, 4] or key == "eval/nll_iwae"  # iwae: at the end
        assert dict(steps).items() <= dict(history(client, long["run_id"], key)).items(), key
    # Its training time goes on from the earlier run's.
    assert (
        run.data.metrics["time/train_s"]
        > client.get_run(short["run_id"]).data.metrics["time/train_s"]
    )


def test_continue_a_parent_run_continues_each_trial(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    store = ["--local", "--tracking-uri", tracking_uri]
    first = run_json(write_spec(in_tmp, experiment_name, epochs=1, seeds="[0, 1]"), *store)
    code, out, err = rlgen(
        "continue", first["parent_run_id"], "--set", "params.epochs=2", *store, "--json"
    )
    assert code == 0, err
    second = json.loads(out)
    client = MlflowClient(tracking_uri)
    before = {t["seed"]: t["run_id"] for t in first["trials"]}
    for trial in second["trials"]:
        run = client.get_run(trial["run_id"])
        assert run.data.tags[TAG_CONTINUED_FROM] == before[trial["seed"]]
        assert [s for s, _ in history(client, trial["run_id"], "eval/neg_elbo")] == [2]
    parent = client.get_run(second["parent_run_id"])
    assert parent.data.tags[TAG_CONTINUED_FROM] == first["parent_run_id"]


def test_init_from_starts_from_the_weights_and_refuses_other_shapes(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    store = ["--local", "--tracking-uri", tracking_uri]
    donor = run_json(write_spec(in_tmp, experiment_name, epochs=3), *store)["trials"][0]
    one = write_spec(in_tmp, experiment_name, epochs=1)
    fresh = run_json(one, *store)["trials"][0]
    forked = run_json(one, *store, "--init-from", donor["run_id"])["trials"][0]
    client = MlflowClient(tracking_uri)
    assert client.get_run(forked["run_id"]).data.tags[TAG_INIT_FROM] == donor["run_id"]
    # One epoch from trained weights beats one from scratch; the steps start at 1.
    ((step, forked_elbo),) = history(client, forked["run_id"], "eval/neg_elbo")
    ((_, fresh_elbo),) = history(client, fresh["run_id"], "eval/neg_elbo")
    assert step == 1 and forked_elbo < fresh_elbo - 1.0

    runs = runs_in(client, experiment_name)
    wider = write_spec(in_tmp, experiment_name, epochs=1, hidden=64)
    code, _, err = rlgen("run", wider, *store, "--init-from", donor["run_id"])
    assert code == 2
    assert "tensor model." in err and "[32] in the checkpoint, [64] in this model" in err
    assert runs_in(client, experiment_name) == runs  # nothing ran


def test_bad_continuations_exit_2_with_one_line_and_create_no_run(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    store = ["--local", "--tracking-uri", tracking_uri]
    done = run_json(write_spec(in_tmp, experiment_name, epochs=1), *store)["trials"][0]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name).experiment_id
    # A run with a spec but no checkpoint (one that failed before its first).
    bare = client.create_run(experiment, tags={"rlgen.algorithm": "vae", "rlgen.seed": "0"})
    client.log_text(
        bare.info.run_id,
        Path(write_spec(in_tmp, "x", epochs=1))
        .read_text()
        .replace("name: x", f"name: {experiment_name}"),
        "spec.yaml",
    )
    client.set_terminated(bare.info.run_id, "FAILED")
    # A run of another algorithm, named by a spec's continue_from.
    gan = in_tmp / "gan.yaml"
    gan.write_text(
        f"name: {experiment_name}\nalgorithm: gan\ncontinue_from: {done['run_id']}\n"
        "params: {epochs: 2, figures: false, fid: {enabled: false}}\n"
    )
    runs = runs_in(client, experiment_name)
    cases: list[tuple[list[str], str]] = [
        (["continue", bare.info.run_id], "has no checkpoint"),
        (["continue", "0123456789abcdef0123456789abcdef"], "not found"),
        (["continue", done["run_id"], "--set", "params.learning_rate=0.1"], "params.learning_rate"),
        (["continue", done["run_id"], "--set", "algorithm=gan"], "algorithm"),
        (["run", str(gan)], "is a vae run, not gan"),
    ]
    for args, expected in cases:
        code, _, err = rlgen(*args, *store)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (args, err)
        assert len(lines) == 1 and expected in lines[0], (args, err)
    assert runs_in(client, experiment_name) == runs


def test_api_continues_an_experiment(api: Any, experiment_name: str, in_tmp: Path) -> None:
    client, jobs, config = api
    body = VAE.format(name=experiment_name, epochs=1, hidden=32, seeds="[0]")
    exp_id = client.post("/experiments", content=body, headers=AUTH).json()["id"]
    response = client.post(
        f"/experiments/{exp_id}/continue", json={"set": ["params.epochs=2"]}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    new_id = response.json()["id"]
    (old_run,) = client.get(f"/experiments/{exp_id}", headers=AUTH).json()["runs"]
    (new_run,) = client.get(f"/experiments/{new_id}", headers=AUTH).json()["runs"]
    mlflow = MlflowClient(config.tracking_uri)
    assert mlflow.get_run(new_run["run_id"]).data.tags[TAG_CONTINUED_FROM] == old_run["run_id"]
    assert [s for s, _ in history(mlflow, new_run["run_id"], "eval/neg_elbo")] == [2]

    bad = client.post(
        f"/experiments/{exp_id}/continue", json={"set": ["params.hidden=[8]"]}, headers=AUTH
    )
    assert bad.status_code == 422 and "params.hidden" in json.dumps(bad.json())
    assert len(jobs.submitted) == 2
