"""Population-based training through Ray Tune's PBT: exploits load the donor's checkpoint, the
trial's MLflow run records the lineage, and the spec's PBT block is validated like a sweep."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.execution import PBT_STOPPED, LaunchResult, fail_stopped_members, launch
from service.spec import SpecBase, SpecError, load_spec
from service.sweeps import expand
from service.tracking import TAG_ERROR, TAG_EXPLOITS

# Two members, one with a poor learning rate. PBT explores only `iwae_k`, which changes the
# evaluation and not the training: after an exploit the exploiting trial trains exactly as its
# donor does from the donor's checkpoint on, which makes "continues from the donor's state"
# checkable to the last bit. (Now and then Ray Tune's synchronous PBT stops a member instead of
# pausing it, ray-project/ray#57906: the launch then fails naming that issue, see
# `test_members_stopped_by_tune_end_failed_saying_why`.)
PBT_VAE = """\
name: {name}
algorithm: vae
params:
  hidden: [32]
  latent_dim: 4
  epochs: 8
  checkpoint_every: 1
  figures: false
  iwae_k: 4
  iwae_examples: 50
  fid: {{enabled: false}}
sweep:
  params:
    learning_rate: [0.00002, 0.005]
  max_concurrent_trials: 2
  scheduler:
    type: pbt
    metric: eval/neg_elbo
    mode: min
    perturbation_interval: 2
    quantile_fraction: 0.5
    synch: true
    hyperparam_mutations:
      iwae_k: [4, 8]
"""


def launch_pbt(spec: SpecBase, tracking_uri: str) -> LaunchResult:
    """A PBT launch, run again once when Ray Tune's synchronous PBT stopped a member instead of
    pausing it (ray-project/ray#57906, about one launch in ten here): that upstream race is not
    what these tests check, and how a launch reports it is checked on its own
    (`test_members_stopped_by_tune_end_failed_saying_why`)."""
    report = launch(spec, mode="ray", tracking_uri=tracking_uri)
    if not report.ok and any(t.error == PBT_STOPPED for t in report.trials):
        report = launch(spec, mode="ray", tracking_uri=tracking_uri)
    return report


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_an_exploit_continues_from_the_donors_checkpoint(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    path = in_tmp / "pbt.yaml"
    path.write_text(PBT_VAE.format(name=experiment_name))
    spec = load_spec(path)
    report = launch_pbt(spec, tracking_uri)
    assert report.ok, [(t.label, t.status, t.error) for t in report.trials]
    client = MlflowClient(tracking_uri)
    runs = {t.label: client.get_run(t.run_id) for t in report.trials}
    assert set(runs) == {t.label for t in expand(spec)}  # one run per member, named by its start
    exploiters = [r for r in runs.values() if TAG_EXPLOITS in r.data.tags]
    assert exploiters, "no exploit happened"
    run = exploiters[0]
    first = run.data.tags[TAG_EXPLOITS].splitlines()[0]
    found = re.match(r"step (\d+): from (.+) \(run (\w+)\) with iwae_k=(\d+)", first)
    assert found, first
    step, donor_label, donor_id = int(found[1]), found[2], found[3]
    assert donor_label != run.data.tags["rlgen.trial"] and runs[donor_label].info.run_id == donor_id
    # The explored value is a curve in the run, set at the exploit's step.
    assert history(client, run.info.run_id, "pbt/iwae_k")[step] == float(found[4])
    # After the exploit the exploiting trial trains as the donor did from that checkpoint on.
    mine, donors = (history(client, r, "train/loss") for r in (run.info.run_id, donor_id))
    after = [s for s in mine if s > step]
    assert after and all(mine[s] == donors[s] for s in after)
    before = [s for s in mine if s <= step]
    assert any(mine[s] != donors[s] for s in before)  # it was another trajectory until then


def test_members_stopped_by_tune_end_failed_saying_why(
    tracking_uri: str, experiment_name: str
) -> None:
    """At the end of a PBT sweep every member's last segment has ended its run FINISHED or
    FAILED; a run still KILLED (a pause never resumed: Tune's synchronous PBT, with concurrent
    members, can stop a member instead of pausing it) ends FAILED with the reason."""
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(experiment_name)
    runs = {}
    for status in ("FINISHED", "FAILED", "KILLED"):
        run_id = client.create_run(experiment).info.run_id
        client.set_terminated(run_id, status)
        runs[status] = client.get_run(run_id)
    assert fail_stopped_members(client, list(runs.values())) == [runs["KILLED"].info.run_id]
    after = {status: client.get_run(run.info.run_id) for status, run in runs.items()}
    assert after["KILLED"].info.status == "FAILED"
    assert "ray-project/ray#57906" in after["KILLED"].data.tags[TAG_ERROR]
    for status in ("FINISHED", "FAILED"):
        assert after[status].info.status == status and TAG_ERROR not in after[status].data.tags


def test_pbt_blocks_are_checked_like_sweeps(tmp_path: Path) -> None:
    bad = PBT_VAE.format(name="x").replace("iwae_k: [4, 8]", "iwae_k: [4, -8]")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "bad.yaml")
    assert "sweep.scheduler.hyperparam_mutations.iwae_k" in str(e.value)
    # Params PBT explores and the sweep does not start at a draw of their own.
    (tmp_path / "ok.yaml").write_text(
        PBT_VAE.format(name="x").replace("iwae_k: [4, 8]", "beta: {uniform: [0.5, 1.0]}")
    )
    trials = expand(load_spec(tmp_path / "ok.yaml"))
    assert all(0.5 <= t.overrides["beta"] <= 1.0 for t in trials)
    assert len({t.overrides["beta"] for t in trials}) == len(trials)
    # DQN's exploits need its replay buffer in the checkpoint.
    dqn = Path(__file__).resolve().parents[1] / "experiments" / "dqn_cartpole.yaml"
    with pytest.raises(SpecError) as e:
        load_spec(
            dqn,
            [
                "sweep={params: {learning_rate: [0.001, 0.002]}, scheduler: {type: pbt, "
                "metric: eval/return_mean, mode: max, perturbation_interval: 1000, "
                "hyperparam_mutations: {learning_rate: {loguniform: [0.0005, 0.005]}}}}",
                "params.checkpoint_buffer=false",
            ],
        )
    assert "checkpoint_buffer" in str(e.value)
    # Synchronous PBT perturbing at the first checkpoint would stall the sweep.
    early = PBT_VAE.format(name="x").replace("interval: 2", "interval: 1")
    (tmp_path / "early.yaml").write_text(early)
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "early.yaml")
    assert "early.yaml:20: sweep.scheduler.perturbation_interval: 1 (+ burn_in_period 0)" in str(
        e.value
    )
    assert "params.checkpoint_every 1" in str(e.value)


SEARCH_VAE = """\
name: {name}
algorithm: vae
seeds: [0, 1]
params:
  hidden: [32]
  latent_dim: 4
  epochs: 3
  figures: false
  iwae_k: 4
  iwae_examples: 50
  fid: {{enabled: false}}
sweep:
  params:
    learning_rate: {{loguniform: [0.0001, 0.01]}}
    batch_size: [64, 128]
  num_samples: 3
  search: {{type: optuna, metric: eval/neg_elbo, mode: min}}
  scheduler: {{type: asha, metric: eval/neg_elbo, mode: min, max_t: 3, grace_period: 1}}
"""


def test_optuna_proposes_configurations_that_every_seed_replicates(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    path = in_tmp / "search.yaml"
    path.write_text(SEARCH_VAE.format(name=experiment_name))
    spec = load_spec(path)
    report = launch(spec, mode="ray", tracking_uri=tracking_uri)
    assert report.ok, [(t.label, t.status, t.error) for t in report.trials]
    client = MlflowClient(tracking_uri)
    configurations: dict[tuple[str, str], set[int]] = {}
    for trial in report.trials:
        params = client.get_run(trial.run_id).data.params
        key = (params["params.learning_rate"], params["params.batch_size"])
        assert 1e-4 <= float(key[0]) <= 1e-2 and key[1] in ("64", "128")
        configurations.setdefault(key, set()).add(trial.seed)
    # 3 proposals, each run once per seed (what the search learns from is their mean).
    assert len(report.trials) == 6 and len(configurations) == 3
    assert all(seeds == {0, 1} for seeds in configurations.values())
    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED"


def test_a_search_needs_the_optuna_extra_and_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracking_uri: str
) -> None:
    import importlib.util

    path = tmp_path / "search.yaml"
    path.write_text(SEARCH_VAE.format(name="x"))
    with pytest.raises(SpecError) as e:
        launch(load_spec(path), mode="local", tracking_uri=tracking_uri)
    assert "a search needs Ray" in str(e.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a)
    )
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert "pip install 'rlgen[optuna]'" in str(e.value) and "sweep.search.type" in str(e.value)


PBT_RL = """\
name: {name}
algorithm: {algorithm}
env: {{id: Pendulum-v1}}
params: {params}
sweep:
  params:
    {rate}: [0.00001, 0.003]
  max_concurrent_trials: 2
  scheduler:
    type: pbt
    metric: eval/return_mean
    mode: max
    perturbation_interval: {interval}
    quantile_fraction: 0.5
    synch: true
    hyperparam_mutations:
      {rate}: {{loguniform: [0.0001, 0.003]}}
"""
# Checkpoints (and so reports to PBT) every 512 or 300 steps; perturbations from the second one
# on (Ray's synchronous PBT does not resume trials it perturbs at their first report).
RL_MEMBERS = {
    "ppo": (
        "learning_rate",
        1000,
        "{total_timesteps: 2048, num_envs: 1, num_steps: 128, hidden_sizes: [16], "
        "eval_every: 512, eval_episodes: 2, checkpoint_every: 512}",
    ),
    "sac": (
        "q_lr",
        500,
        "{total_timesteps: 1200, learning_starts: 100, batch_size: 32, hidden_sizes: [16], "
        "eval_every: 300, eval_episodes: 1, checkpoint_every: 300, checkpoint_buffer: true}",
    ),
}


@pytest.mark.parametrize("algorithm", sorted(RL_MEMBERS))
def test_pbt_runs_ppo_and_sac(
    algorithm: str, ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    """PPO's and SAC's members pause, exploit (the donor's networks, optimizer, envs and, for
    SAC, replay) and continue their own MLflow runs to the end of the budget."""
    rate, interval, params = RL_MEMBERS[algorithm]
    path = in_tmp / "pbt.yaml"
    text = PBT_RL.format(
        name=experiment_name, algorithm=algorithm, params=params, rate=rate, interval=interval
    )
    path.write_text(text)
    report = launch_pbt(load_spec(path), tracking_uri)
    assert report.ok, [(t.label, t.status, t.error) for t in report.trials]
    client = MlflowClient(tracking_uri)
    runs = [client.get_run(t.run_id) for t in report.trials]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert any(TAG_EXPLOITS in r.data.tags for r in runs), "no exploit happened"
    for r in runs:
        evals = history(client, r.info.run_id, "eval/return_mean")
        budget = 2048 if algorithm == "ppo" else 1200
        assert max(evals) >= budget - 256  # evaluated up to the end of the budget
        assert history(client, r.info.run_id, f"pbt/{rate}")  # its rate as a curve
