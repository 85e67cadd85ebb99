"""Sweeps: spec validation, trial expansion, child runs under one parent with aggregates, ASHA."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.aggregates import aggregate
from service.execution import expand, launch
from service.spec import SpecError, load_spec
from service.tracking import TAG_PARENT, TAG_STOPPED_EARLY, TAG_TRIAL

from .conftest import ROOT

SWEEP = """\
name: {name}
algorithm: q_learning
env:
  id: FrozenLake-v1
params:
  total_timesteps: 3000
  eval_every: 500
  eval_episodes: 20
seeds: [0, 1]
sweep:
  params:
    learning_rate: {{grid: [0.1, 0.5]}}
    exploration_fraction: {{uniform: [0.2, 0.8]}}
report: [eval/return_mean, eval/value_gap]
"""


def write(tmp: Path, text: str) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(text)
    return path


def test_expansion_crosses_grid_samples_and_seeds(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, SWEEP.format(name="x")), ["sweep.num_samples=3"])
    trials = expand(spec)
    assert len(trials) == 2 * 3 * 2  # grid points x samples x seeds
    # Seeds replicate one configuration: same swept values, different seeds.
    for i in range(0, len(trials), 2):
        a, b = trials[i], trials[i + 1]
        assert (a.seed, b.seed) == (0, 1) and a.overrides == b.overrides
    draws = [t.overrides["exploration_fraction"] for t in trials[::2]]
    assert all(0.2 <= d <= 0.8 for d in draws) and len(set(draws)) == len(draws)
    assert {t.overrides["learning_rate"] for t in trials} == {0.1, 0.5}
    assert expand(spec) == trials  # the same spec expands the same way
    assert trials[0].label.startswith("s0 exploration_fraction=")


def test_every_trial_of_an_expansion_is_distinct_and_named_apart(tmp_path: Path) -> None:
    """Trial labels name the MLflow runs: equal labels made a finished sweep's parent FAILED
    (--local) and lost a trial's report (Ray). Repeats of a choice run once; random draws keep
    the 4 significant digits their labels show; close grid values get labels apart."""
    from service.trial import LABEL_MAX, trial_label

    text = SWEEP.format(name="x").replace(
        "    learning_rate: {grid: [0.1, 0.5]}\n    exploration_fraction: {uniform: [0.2, 0.8]}\n",
        "    update: {choice: [q_learning, sarsa]}\n"
        "    learning_rate: {loguniform: [0.1, 0.1002]}\n",
    )
    trials = expand(load_spec(write(tmp_path, text), ["sweep.num_samples=200"]))
    labels = [t.label for t in trials]
    assert len(set(labels)) == len(labels)
    assert len({(t.seed, *sorted(t.overrides.items())) for t in trials}) == len(trials)
    assert 2 * 2 <= len(trials) < 2 * 200  # 2 seeds x (2 updates x a few 4-digit rates)
    assert all(
        float(f"{t.overrides['learning_rate']:.4g}") == t.overrides["learning_rate"] for t in trials
    )
    assert trial_label(0, {"lr": 0.00012345}) != trial_label(0, {"lr": 0.00012346})
    assert trial_label(0, {"lr": 0.001}) == "s0 lr=0.001"
    # A sweep over long lists: the label (the rlgen.trial tag, <= 8000 characters on an MLflow
    # server) is cut, and lists that differ only past the cut still get labels apart.
    long_a, long_b = list(range(3000)), [*range(2999), -1]
    cut_a, cut_b = (
        trial_label(0, {"hidden_sizes": long_a}),
        trial_label(0, {"hidden_sizes": long_b}),
    )
    assert len(cut_a) <= LABEL_MAX and len(cut_b) <= LABEL_MAX and cut_a != cut_b
    assert cut_a.startswith("s0 hidden_sizes=[0, 1, 2") and cut_a == trial_label(
        0, {"hidden_sizes": long_a}
    )


BAD_SWEEPS = {
    "unknown field": (
        "    learning_rat: {grid: [0.1]}\n",
        ":12: sweep.params.learning_rat: 'learning_rat' is not a field of q_learning's params; "
        "did you mean 'learning_rate'?",
    ),
    "invalid value": (
        "    learning_rate: {grid: [0.1, 2.0]}\n",
        ":12: sweep.params.learning_rate: 2.0: Input should be less than or equal to 1",
    ),
    "two kinds": (
        "    learning_rate: {grid: [0.1], uniform: [0.1, 0.2]}\n",
        ":12: sweep.params.learning_rate: give exactly one of grid, choice, uniform, loguniform",
    ),
    "empty bounds": (
        "    learning_rate: {loguniform: [0.0, 0.5]}\n",
        "loguniform: bounds must be positive",
    ),
    "too many trials": (
        "".join(
            f"    {k}: {{grid: [{', '.join(str(0.01 * (i + 1)) for i in range(20))}]}}\n"
            for k in ("learning_rate", "exploration_fraction", "final_learning_rate", "gamma")
        ),
        ":10: sweep: expands to 320,000 trials (seeds x grid points x num_samples); at most",
    ),
    "bad literal": (
        "    update: {choice: [q_learning, dqn]}\n",
        ":12: sweep.params.update: 'dqn': Input should be 'q_learning', 'sarsa' or 'expected_sarsa'",
    ),
}


DBN = """\
name: x
algorithm: dbn
params:
  layers: [32, 16]
  pretraining: {pretraining}
sweep:
  params:
    pretraining.learning_rate: {{grid: [0.01, 0.05]}}
    pretraining.k: {{grid: [1, 3]}}
"""


def test_sweeps_reach_fields_of_nested_configs(tmp_path: Path) -> None:
    """dbn's `pretraining` is `PretrainConfig | list[PretrainConfig]`: its fields sweep as
    dotted paths; a per-layer list has no such path, and the error says so."""
    spec = load_spec(write(tmp_path, DBN.format(pretraining="{epochs: 1}")))
    trials = expand(spec)
    swept = {
        (t.overrides["pretraining.learning_rate"], t.overrides["pretraining.k"]) for t in trials
    }
    assert swept == {(0.01, 1), (0.01, 3), (0.05, 1), (0.05, 3)}
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, DBN.format(pretraining="[{epochs: 1}, {epochs: 2}]")))
    assert ":8: sweep.params.pretraining.learning_rate: cannot set" in str(e.value)
    assert "'pretraining' is not a mapping" in str(e.value)
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, DBN.format(pretraining="{}").replace("ing.k:", "ing.kk:")))
    assert "'pretraining.kk' is not a field of dbn's params; did you mean" in str(e.value)


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweeps_name_file_line_and_field(tmp_path: Path, case: str) -> None:
    line, fragment = BAD_SWEEPS[case]
    text = SWEEP.format(name="x").replace(
        "    learning_rate: {grid: [0.1, 0.5]}\n    exploration_fraction: {uniform: [0.2, 0.8]}\n",
        line,
    )
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    assert fragment in str(e.value), str(e.value)


def test_local_sweep_logs_children_under_one_parent_with_aggregates(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    spec = load_spec(write(in_tmp, SWEEP.format(name=experiment_name)))
    report = launch(spec, mode="local", tracking_uri=tracking_uri)
    assert report.ok and len(report.trials) == 4
    client = MlflowClient(tracking_uri)
    parent = client.get_run(report.parent_run_id)  # type: ignore[arg-type]
    assert parent.info.status == "FINISHED"
    children = [client.get_run(t.run_id) for t in report.trials]
    assert {c.data.tags[TAG_PARENT] for c in children} == {report.parent_run_id}
    assert {c.data.params["params.learning_rate"] for c in children} == {"0.1", "0.5"}
    labels = {c.data.tags[TAG_TRIAL] for c in children}
    assert len(labels) == 4
    # Names the UI's runs table and legends can show: what differs first, short.
    for child in children:
        name, seed = child.info.run_name, child.data.tags["rlgen.seed"]
        lr = child.data.params["params.learning_rate"]
        assert name.startswith("exploration_fraction=") and f"learning_rate={lr}" in name
        assert name.endswith(f" s{seed}") and len(name) <= 60
        # Params are settings: the hyperparameters, the env, the seed; no bookkeeping.
        params = child.data.params
        assert params["seed"] == seed and params["algorithm"] == "q_learning"
        assert params["env.id"] == "FrozenLake-v1"
        assert not [
            k
            for k in params
            if k.split(".")[0]
            in (
                "name",
                "resources",
                "driver",
                "tags",
                "report",
                "sweep",
                "seeds",
                "max_failures",
                "description",
            )
        ]
    assert parent.info.run_name == f"{experiment_name} (all trials)"
    about = parent.data.tags["mlflow.note.content"]
    assert "q_learning on FrozenLake-v1" in about and "4 trials" in about
    # The parent: the best group's aggregates, the table of all groups, the curves.
    groups = aggregate(children, ["eval/return_mean"])
    assert len(groups) == 2 and all(g.n == 2 for g in groups)
    best = max(groups, key=lambda g: g.mean)
    m = parent.data.metrics
    assert m["eval/return_mean/mean"] == pytest.approx(best.mean)
    assert m["eval/return_mean/n"] == 2
    assert m["eval/return_mean/ci95_low"] <= best.mean <= m["eval/return_mean/ci95_high"]
    assert "eval/value_gap/mean" in m
    assert parent.data.tags["rlgen.best_group"] == best.group
    # The parent draws the best configuration's IQM curve in the UI's chart view.
    curve = client.get_metric_history(parent.info.run_id, "eval/return_mean")
    best_runs = [c for c in children if c.data.tags[TAG_TRIAL].endswith(best.group)]
    history = [client.get_metric_history(c.info.run_id, "eval/return_mean") for c in best_runs]
    assert len(curve) == len(history[0]) > 1
    low = min(m.value for h in history for m in h)
    high = max(m.value for h in history for m in h)
    assert all(low <= m.value <= high for m in curve)
    table = client.download_artifacts(parent.info.run_id, "report.csv", str(in_tmp))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 4  # 2 groups x 2 metrics
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/curves_eval_return_mean.png" in figures


def test_confidence_interval_is_students_t() -> None:
    from mlflow.entities import Metric as M
    from mlflow.entities import Run, RunData, RunInfo

    def run(value: float) -> Run:
        info = RunInfo("r", "0", "u", "FINISHED", 0, 0, "active")
        return Run(info, RunData(metrics=[M("m", value, 0, 0)], tags=[]))

    (a,) = aggregate([run(1.0), run(2.0), run(3.0)], ["m"])
    # mean 2, s = 1, t_{0.975, 2} = 4.303: half-width 4.303 / sqrt(3) = 2.484
    assert a.mean == 2.0 and a.std == 1.0
    assert a.t_ci95[1] - 2.0 == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    # The bootstrap intervals stay within the values; t's does not.
    assert 1.0 <= a.ci95[0] < 2.0 < a.ci95[1] <= 3.0 and a.t_ci95[1] > 3.0


def test_ray_sweep_with_asha_stops_trailing_trials(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    text = f"""\
name: {experiment_name}
algorithm: q_learning
env: {{id: FrozenLake-v1}}
params: {{total_timesteps: 40000, eval_every: 2000, eval_episodes: 50}}
seeds: [0]
sweep:
  params:  # the good step sizes run first and set the bar the tiny ones then miss
    learning_rate: {{grid: [0.5, 0.6, 0.000001, 0.000002]}}
  max_concurrent_trials: 2
  scheduler: {{metric: eval/return_mean, mode: max, max_t: 20, grace_period: 2, reduction_factor: 2}}
"""
    spec = load_spec(write(in_tmp, text))
    report = launch(spec, mode="ray", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    statuses = {t.label: t.status for t in report.trials}
    assert len(statuses) == 4
    stopped = [t for t in report.trials if t.status == "KILLED"]
    assert stopped, statuses  # ASHA stopped at least one trailing trial
    # ASHA's cut depends on arrival order; a good step size always completes.
    assert "FINISHED" in (statuses["s0 learning_rate=0.5"], statuses["s0 learning_rate=0.6"])
    assert report.ok  # stopping trailing trials is how a sweep with ASHA ends, not a failure
    for t in stopped:
        assert t.stopped_early
        run = client.get_run(t.run_id)
        assert run.data.tags[TAG_STOPPED_EARLY] == "asha"
        assert client.get_metric_history(t.run_id, "eval/return_mean")  # what it logged is kept
    assert all(t.status in ("FINISHED", "KILLED") for t in report.trials), statuses
    parent = client.get_run(report.parent_run_id)  # type: ignore[arg-type]
    assert parent.info.status == "FINISHED"
    assert "eval/return_mean/mean" in parent.data.metrics


def test_scheduler_metric_and_report_must_be_metrics_the_algorithm_logs(tmp_path: Path) -> None:
    text = SWEEP.format(name="x").replace(
        "report: [eval/return_mean, eval/value_gap]\n",
        "  scheduler: {metric: eval/retrun_mean, mode: max}\nreport: [eval/value_gap, loss]\n",
    )
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    lines = str(e.value).splitlines()
    assert lines[0].endswith(
        ":15: report[1]: q_learning never logs 'loss'; it logs: charts/episodic_return, "
        "charts/episodic_length, charts/epsilon, charts/learning_rate, charts/episodes, "
        "eval/return_mean, eval/return_std, eval/length_mean, eval/value_gap, time/train_s"
    ), lines
    assert lines[1].endswith(
        ":14: sweep.scheduler.metric: q_learning never logs 'eval/retrun_mean'; "
        "did you mean 'eval/return_mean'?"
    ), lines


def test_a_scheduler_metric_this_configuration_never_logs_fails_its_trials_not_the_sweep(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    """eval/value_gap is a Q-learning metric, but with gamma = 1 (no finite optimum to compare
    with) it is never logged: each trial ends FAILED saying so, and the sweep itself ends."""
    text = f"""\
name: {experiment_name}
algorithm: q_learning
env: {{id: FrozenLake-v1}}
params: {{total_timesteps: 1000, eval_every: 500, eval_episodes: 5, gamma: 1.0}}
seeds: [0, 1]
sweep:
  params: {{learning_rate: {{grid: [0.5]}}}}
  scheduler: {{metric: eval/value_gap, mode: min, max_t: 4, grace_period: 1}}
"""
    report = launch(load_spec(write(in_tmp, text)), mode="ray", tracking_uri=tracking_uri)
    assert not report.ok and len(report.trials) == 2
    client = MlflowClient(tracking_uri)
    for t in report.trials:
        assert t.status == "FAILED"
        assert t.error is not None and "never logged 'eval/value_gap'" in t.error
        assert "eval/return_mean" in t.error  # what it did log
        assert client.get_metric_history(t.run_id, "eval/return_mean")  # and kept
    parent = client.get_run(report.parent_run_id)  # type: ignore[arg-type]
    assert parent.info.status == "FAILED"


def test_tune_stops_every_trial_once_ctrl_c_set_the_event() -> None:
    import pickle
    import threading

    from service.tuning import _StopOnRequest

    event = threading.Event()
    stopper = _StopOnRequest(event)
    assert not stopper.stop_all() and not stopper("trial", {})
    event.set()
    assert stopper.stop_all() and stopper("trial", {})
    assert not pickle.loads(pickle.dumps(stopper)).stop_all()  # the event stays with the driver


def test_trials_start_on_the_workers_that_imported_them(ray_cluster: None) -> None:
    """`warm_up` has as many workers as trials will run at once import `service.trial`; Ray
    gives the next task to the worker that ran the last, so the trial starts warm."""
    import os

    import ray

    from service.execution import room_for, warm_up

    spec = load_spec(ROOT / "experiments" / "dqn_cartpole.yaml", ["seeds=[0]"])
    assert room_for(spec) == 2  # the session's cluster: 2 CPUs, one per trial
    assert len(warm_up(spec, 5)) == 2 and len(warm_up(spec, 1)) == 1
    # Both workers that ran a warm-up task are warm; the next task may go to either.
    warmed = set(ray.get(warm_up(spec, 5))) | set(ray.get(warm_up(spec, 1)))

    def where() -> tuple[int, bool]:
        import sys

        return os.getpid(), "service.trial" in sys.modules

    pid, imported = ray.get(ray.remote(where).options(num_cpus=1).remote())
    assert pid in warmed and imported
