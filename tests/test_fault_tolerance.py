"""A trial whose worker process dies is restarted by Ray (a single trial's task, or Ray Tune's
trial in a sweep) and continues its MLflow run from its last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from service.execution import LaunchResult, launch
from service.spec import load_spec
from service.tracking import TAG_RESTARTS

from .conftest import ROOT


def trial_workers() -> list[int]:
    """Pids of Ray workers running a trial: a task named `rlgen:...` or a Tune function trial
    (`ray::ImplicitFunc...`), by their process titles."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if cmdline.startswith((b"ray::rlgen:", b"ray::ImplicitFunc")):
                found.append(int(proc.name))
    return found


def launch_and_kill_a_trial_worker(
    spec: Any, tracking_uri: str, experiment_name: str
) -> LaunchResult:
    """Launch `spec` on Ray, SIGKILL one trial worker once every trial has a checkpoint, and
    return the launch's result."""
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "report", launch(spec, mode="ray", tracking_uri=tracking_uri)
        )
    )
    thread.start()
    client = MlflowClient(tracking_uri)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.1)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            continue
        # Which worker runs which trial is not visible from here: wait until every trial has a
        # checkpoint, so that whichever worker is killed, its trial has one to resume from.
        runs = client.search_runs([experiment.experiment_id], "tags.`rlgen.seed` != ''")
        if len(runs) == len(spec.seeds) and all(
            client.list_artifacts(run.info.run_id, "checkpoints") for run in runs
        ):
            workers = trial_workers()
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
    assert killed is not None, "never saw a checkpoint and a trial worker to kill"
    thread.join(timeout=300)
    report: LaunchResult = result["report"]
    return report


# Under Ray Tune, an ASHA that never stops anyone (its grace period is the whole trial).
ASHA = "sweep={params: {gamma: [0.99]}, scheduler: {metric: eval/return_mean, mode: max, max_t: 100, grace_period: 100}}"


@pytest.mark.parametrize(
    ("seeds", "relay", "tune"),
    [("[0]", True, False), ("[0, 1]", True, False), ("[0, 1]", True, True), ("[0]", False, False)],
    ids=["task", "tasks", "tune", "task-cluster-path"],
)
def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(
    ray_cluster: None,
    tracking_uri: str,
    experiment_name: str,
    in_tmp: Path,
    seeds: str,
    relay: bool,
    tune: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the driver's relay (the embedded cluster's path to MLflow), and with trials
    opening MLflow themselves (the path on other clusters)."""
    if not relay:
        monkeypatch.setattr("service.execution.embedded", lambda: False)
    spec = load_spec(
        ROOT / "experiments" / "dqn_cartpole.yaml",
        [
            f"name={experiment_name}",
            f"seeds={seeds}",
            "max_failures=1",
            "params.total_timesteps=12000",
            "params.stop_at_return=null",
            "params.checkpoint_every=2000",
            "params.checkpoint_buffer=true",
            "params.eval_every=2000",
            *([ASHA] if tune else []),
        ],
    )
    report = launch_and_kill_a_trial_worker(spec, tracking_uri, experiment_name)
    assert report.ok, [(t.status, t.error) for t in report.trials]
    client = MlflowClient(tracking_uri)
    # The restart continued the killed trial's run: one run per trial, all FINISHED.
    assert sorted(t.seed for t in report.trials) == spec.seeds
    restarts = 0
    for trial in report.trials:
        run = client.get_run(trial.run_id)
        assert run.info.status == "FINISHED"
        if TAG_RESTARTS in run.data.tags:
            restarts += 1
            assert run.data.tags[TAG_RESTARTS] == "1"
            assert run.data.tags["rlgen.resumed_from"].startswith("checkpoints/step_")
        for key in ("losses/td_loss", "eval/return_mean", "charts/episodic_return"):
            steps = [m.step for m in client.get_metric_history(trial.run_id, key)]
            assert steps, key
            if key != "charts/episodic_return":  # several episodes may end at one step
                assert len(steps) == len(set(steps)), f"{key} logged a step twice"
        last_eval = client.get_metric_history(trial.run_id, "eval/return_mean")
        assert max(m.step for m in last_eval) >= 12000
    assert restarts == 1  # only the killed worker's trial restarted


def test_directories_of_trials_whose_process_died_are_removed(tmp_path: Path) -> None:
    """A killed worker or an ASHA-stopped trial never reaches its cleanup; the next trial on the
    machine removes what such trials left (their files are in MLflow), and nothing else."""
    from service.trial import OWNER_FILE, remove_abandoned_workdirs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live, foreign = (tmp_path / f"rlgen-{n}-x" for n in ("dead", "live", "foreign"))
    for d, owner in ((dead, gone.pid), (live, os.getpid()), (foreign, None)):
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "step_1.pt").write_bytes(b"x" * 1000)
        if owner is not None:
            (d / OWNER_FILE).write_text(str(owner))
    assert remove_abandoned_workdirs(tmp_path) == 1
    assert not dead.exists() and live.exists() and foreign.exists()


VAE_SPEC = """\
name: {name}
algorithm: vae
seeds: [0]
max_failures: 1
params:
  hidden: [1024, 1024]
  latent_dim: 8
  batch_size: 32
  epochs: 16
  iwae_every: 4
  iwae_k: 8
  iwae_examples: 200
  figures: false
  fid: {{enabled: false}}
"""


def test_a_killed_vae_worker_resumes_and_ends_as_an_uninterrupted_run(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    """Not only DQN: the VAE's checkpoint (weights, optimizer, batch order, noise) makes the
    restarted trial's curve the one an uninterrupted run logs, to the last bit."""
    path = in_tmp / "vae.yaml"
    path.write_text(VAE_SPEC.format(name=experiment_name))
    spec = load_spec(path)
    report = launch_and_kill_a_trial_worker(spec, tracking_uri, experiment_name)
    assert report.ok, [(t.status, t.error) for t in report.trials]
    client = MlflowClient(tracking_uri)
    (trial,) = report.trials
    run = client.get_run(trial.run_id)
    assert run.data.tags[TAG_RESTARTS] == "1"
    assert run.data.tags["rlgen.resumed_from"].startswith("checkpoints/step_")

    whole = launch(
        spec.model_copy(update={"max_failures": 0}), mode="local", tracking_uri=tracking_uri
    ).trials[0]
    for key in ("train/loss", "eval/neg_elbo", "eval/recon", "eval/kl", "eval/nll_iwae"):
        resumed = [(m.step, m.value) for m in client.get_metric_history(trial.run_id, key)]
        uninterrupted = [(m.step, m.value) for m in client.get_metric_history(whole.run_id, key)]
        assert sorted(resumed) == sorted(uninterrupted), key


def test_a_trial_out_of_memory_fails_saying_so(
    tracking_uri: str, experiment_name: str, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import torch

    from service import registry

    real = registry.ALGORITHMS["value_iteration"]

    def too_big(config: Any, ctx: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(
        registry.ALGORITHMS, "value_iteration", dataclasses.replace(real, train=too_big)
    )
    spec = load_spec(
        ROOT / "experiments" / "value_iteration_frozenlake.yaml",
        [f"name={experiment_name}", "seeds=[0]"],
    )
    report = launch(spec, mode="local", tracking_uri=tracking_uri)
    (trial,) = report.trials
    assert trial.status == "FAILED" and trial.error is not None
    assert trial.error.startswith("OutOfMemoryError: out of host memory: CUDA out of memory.")
    assert "lower the batch size" in trial.error


def test_a_trial_that_fails_in_its_algorithm_is_not_retried_by_tune(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    """`max_failures` restarts trials whose worker died; an error of the algorithm (the FID
    cache cannot be created under /proc) ends the trial FAILED once, under Tune as well."""
    spec = load_spec(
        ROOT / "experiments" / "gan_digits.yaml",
        [
            f"name={experiment_name}",
            "seeds=[0]",
            "max_failures=2",
            "params.epochs=1",
            "dataset.limit=200",
            "params.fid.cache=/proc/rlgen-test/fid",
            "sweep={params: {learning_rate: [0.0002, 0.0004]}, scheduler: "
            "{metric: eval/fid, mode: min, max_t: 2}}",
        ],
    )
    started = time.monotonic()
    report = launch(spec, mode="ray", tracking_uri=tracking_uri)
    assert not report.ok and len(report.trials) == 2
    client = MlflowClient(tracking_uri)
    for trial in report.trials:
        assert trial.status == "FAILED" and "/proc/rlgen-test" in (trial.error or "")
        assert TAG_RESTARTS not in client.get_run(trial.run_id).data.tags  # ran once
    assert time.monotonic() - started < 120
