"""The `rlgen` command end to end: runs in MLflow, exit codes, failures, interrupts."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from service import registry
from service.cli import ProgressTable, app

from .conftest import ROOT, alive

FROZEN = str(ROOT / "experiments" / "value_iteration_frozenlake.yaml")
FAST = ["--set", "params.eval_episodes=20"]


def common(tracking_uri: str, experiment_name: str) -> list[str]:
    """The options every test run shares: its store, its own experiment, a small evaluation."""
    return ["--tracking-uri", tracking_uri, "--set", f"name={experiment_name}", *FAST]


def rlgen(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str) -> dict[str, Any]:
    code, out, err = rlgen("run", *args, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_local_run_logs_params_tags_metrics_and_figures(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    out = run_json(
        FROZEN, "--local", "--tracking-uri", tracking_uri, "--set", f"name={experiment_name}", *FAST
    )
    assert out["experiment"] == experiment_name
    assert [t["seed"] for t in out["trials"]] == [0, 1]
    client = MlflowClient(tracking_uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["params.gamma"] == "0.99"
    assert json.loads(parent.data.params["seeds"]) == [0, 1]
    for trial in out["trials"]:
        assert trial["status"] == "FINISHED"
        run = client.get_run(trial["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
        for tag in ("rlgen.version", "rlgen.spec_hash", "rlgen.git_commit"):
            assert run.data.tags.get(tag), tag
        assert run.data.params["env.id"] == "FrozenLake-v1"
        assert run.data.params["env.kwargs.is_slippery"] == "True"
        assert run.data.params["seed"] == str(trial["seed"])
        m = trial["metrics"]
        assert m["time/train_s"] > 0 and m["solver/converged"] == 1.0
        assert 0.55 < m["eval/return_mean"] <= 1.0  # the optimal policy succeeds ~74% of the time
        history = client.get_metric_history(trial["run_id"], "solver/bellman_residual")
        assert len(history) == m["solver/iterations"]
        artifacts = {a.path for a in client.list_artifacts(trial["run_id"])}
        assert "spec.yaml" in artifacts
        figures = {a.path for a in client.list_artifacts(trial["run_id"], "figures")}
        assert figures == {"figures/bellman_residual.png", "figures/value_heatmap.png"}


def test_from_run_reproduces_a_trial(tracking_uri: str, experiment_name: str, in_tmp: Path) -> None:
    first = run_json(
        FROZEN,
        "--local",
        "--tracking-uri",
        tracking_uri,
        "--set",
        f"name={experiment_name}",
        "--set",
        "seeds=[5]",
    )
    assert first["parent_run_id"] is None  # one trial: no parent run
    run_id = first["trials"][0]["run_id"]
    again = run_json("--from-run", run_id, "--local", "--tracking-uri", tracking_uri)
    client = MlflowClient(tracking_uri)
    a, b = client.get_run(run_id), client.get_run(again["trials"][0]["run_id"])
    assert a.data.tags["rlgen.spec_hash"] == b.data.tags["rlgen.spec_hash"]
    assert a.data.params == b.data.params
    for key in ("eval/return_mean", "solver/iterations", "solver/value_mean"):
        assert a.data.metrics[key] == b.data.metrics[key]
    # Which one would run is anyone's guess: refused.
    code, _, err = rlgen("run", FROZEN, "--from-run", run_id, "--tracking-uri", tracking_uri)
    assert code == 2 and "give a SPEC file or --from-run RUN_ID, not both" in err, err


def test_ray_run_on_the_shared_cluster(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    out = run_json(
        str(ROOT / "experiments" / "policy_iteration_taxi.yaml"),
        *common(tracking_uri, experiment_name),
        "--set",
        "seeds=[0, 1]",
    )
    assert [t["status"] for t in out["trials"]] == ["FINISHED", "FINISHED"]
    assert all(t["metrics"]["eval/return_mean"] > 5 for t in out["trials"])  # optimal Taxi: ~7.9
    assert MlflowClient(tracking_uri).get_run(out["parent_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("seeds", ["[0]", "[0, 1, 2]"], ids=["task", "tune"])
def test_gpu_trials_get_their_share_of_the_clusters_gpus(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path, seeds: str
) -> None:
    # The session's cluster declares 2 logical GPUs; a trial asking for half a GPU is placed on
    # one of them (Ray sets its CUDA_VISIBLE_DEVICES) and records which; with no CUDA here, the
    # `auto` device falls back to the CPU and the trial finishes.
    out = run_json(
        str(ROOT / "experiments" / "policy_iteration_taxi.yaml"),
        *common(tracking_uri, experiment_name),
        "--set",
        f"seeds={seeds}",
        "--set",
        "resources.num_gpus=0.5",
    )
    client = MlflowClient(tracking_uri)
    for trial in out["trials"]:
        assert trial["status"] == "FINISHED"
        assert client.get_run(trial["run_id"]).data.tags["rlgen.gpu_ids"] in ("0", "1")


def test_failing_trial_is_failed_with_reason_and_others_go_on(
    tracking_uri: str, experiment_name: str, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = registry.ALGORITHMS["value_iteration"]

    def flaky(config: Any, ctx: Any) -> None:
        if ctx.seed == 1:
            raise RuntimeError("boom on seed 1")
        real.train(config, ctx)

    monkeypatch.setitem(
        registry.ALGORITHMS, "value_iteration", dataclasses.replace(real, train=flaky)
    )
    code, out, err = rlgen(
        "run",
        FROZEN,
        "--local",
        "--json",
        *common(tracking_uri, experiment_name),
        "--set",
        "seeds=[0, 1, 2]",
    )
    assert code == 1
    result = json.loads(out)
    assert [t["status"] for t in result["trials"]] == ["FINISHED", "FAILED", "FINISHED"]
    client = MlflowClient(tracking_uri)
    failed = client.get_run(result["trials"][1]["run_id"])
    assert failed.data.tags["rlgen.error"] == "RuntimeError: boom on seed 1"
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert client.get_run(result["parent_run_id"]).info.status == "FAILED"
    assert "boom on seed 1" in err
    assert "eval/return_mean" in err  # the progress table's result column


def test_failure_inside_a_ray_worker(
    ray_cluster: None, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    # The FID classifier's cache cannot be created under /proc: the trials fail inside their
    # workers (validation cannot know), which must end their runs FAILED with the reason.
    code, out, err = rlgen(
        "run",
        str(ROOT / "experiments" / "gan_digits.yaml"),
        "--json",
        *("--tracking-uri", tracking_uri, "--set", f"name={experiment_name}"),
        *("--set", "params.fid.cache=/proc/rlgen-test/fid", "--set", "seeds=[0, 1]"),
        *("--set", "params.epochs=1", "--set", "dataset.limit=200"),
    )
    assert code == 1, err
    result = json.loads(out)
    client = MlflowClient(tracking_uri)
    for trial in result["trials"]:
        assert trial["status"] == "FAILED"
        assert "/proc/rlgen-test" in client.get_run(trial["run_id"]).data.tags["rlgen.error"]
    assert client.get_run(result["parent_run_id"]).info.status == "FAILED"


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "params.gamma=1.5"],
        ["--set", "params.nope=1"],
        ["--set", "env.id=NoSuchEnv-v0"],
        ["--set", "resources.num_cpus=64"],  # more than the embedded cluster has
        ["--set", "resources.device=cuda"],  # without a GPU reserved Ray hides every GPU
    ],
)
def test_invalid_input_exits_2_and_creates_nothing(
    tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch, ray_cluster: None
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "fresh.db"
    code, _, err = rlgen("run", FROZEN, "--tracking-uri", f"sqlite:///{db}", *args)
    assert code == 2, err
    assert "error:" in err
    assert not db.exists()  # no store, so certainly no run


def test_more_resources_than_the_embedded_cluster_has_names_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_cluster: None
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "big.yaml"
    spec.write_text(
        "name: big\nalgorithm: value_iteration\nenv: {id: FrozenLake-v1}\n"
        "resources:\n  num_cpus: 1\n  num_gpus: 64\n"
    )
    code, _, err = rlgen("run", str(spec), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2, err
    assert f"error: {spec}:6: resources.num_gpus: a trial asks for 64 GPUs" in err, err
    code, _, err = rlgen("run", str(spec), "--set", "resources.num_cpus=64")
    assert code == 2, err
    assert "error: --set resources.num_cpus=64: resources.num_cpus: a trial asks for 64" in err
    assert list(tmp_path.iterdir()) == [spec]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_a_tracking_uri_that_cannot_work_exits_2_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: bool, ray_cluster: None
) -> None:
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    cases = {
        "./mlruns": "MLflow's file store, which MLflow 3 no longer accepts",
        f"http://127.0.0.1:{port}": f"no MLflow server answers at http://127.0.0.1:{port}",
        "bogus://u:hunter2@x": "cannot open the tracking store bogus://u:***@x",
    }
    for uri, fragment in cases.items():
        t = time.monotonic()
        code, _, err = rlgen("run", FROZEN, "--tracking-uri", uri, *(["--local"] if local else []))
        assert code == 2, err
        assert "error: --tracking-uri: " in err and fragment in err.replace("\n", ""), err
        assert "hunter2" not in err
        assert time.monotonic() - t < 30
    assert list(tmp_path.iterdir()) == []  # no store, no run, nothing


def test_commands_that_read_runs_refuse_a_store_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped path is not a new, empty store to look for the run in."""
    monkeypatch.chdir(tmp_path)
    for args in (("evaluate", "0" * 32), ("run", "--from-run", "0" * 32, "--local")):
        code, _, err = rlgen(*args, "--tracking-uri", "sqlite:///typo.db")
        assert code == 2, err
        assert "no tracking store at sqlite:///" in err and "typo.db" in err, err
    assert list(tmp_path.iterdir()) == []


def test_jobs_commands_want_the_jobs_api_url() -> None:
    """A GCS address (what `rlgen run --address` takes) is the usual mistake: said first."""
    for args in (("submit", FROZEN), ("status",), ("logs", "j"), ("cancel", "j"), ("list",)):
        code, _, err = rlgen(*args, "--address", "127.0.0.1:6379")
        assert code == 2, err
        assert err.startswith("error: --address: expected the Jobs API URL http://HEAD:8265"), err


@pytest.fixture
def api_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """RLGEN_API_TOKEN set for one test (settings are read once per process, then cached)."""
    from service.settings import get_settings

    monkeypatch.setenv("RLGEN_API_TOKEN", "t")
    get_settings.cache_clear()
    yield "t"
    get_settings.cache_clear()


def test_submit_and_serve_refuse_a_file_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api_token: str
) -> None:
    """Their store is reached from the cluster (it may not be from here), but a file store can
    never work."""
    monkeypatch.chdir(tmp_path)
    for args in (
        ("submit", FROZEN, "--address", f"http://127.0.0.1:{_free_port()}"),
        ("serve", "--address", f"http://127.0.0.1:{_free_port()}", "--port", str(_free_port())),
    ):
        code, _, err = rlgen(*args, "--tracking-uri", "file:./mlruns")
        assert code == 2 and "MLflow's file store" in err, err


def test_serve_on_a_port_in_use_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api_token: str
) -> None:
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = rlgen(
            "serve", "--port", str(port), "--address", f"http://127.0.0.1:{_free_port()}",
            "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
        )  # fmt: skip
    assert code == 2, err
    assert err.startswith(f"error: --host/--port: cannot listen on 127.0.0.1:{port}: Address"), err


def test_invalid_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: t\nalgorithm: value_iteration\nenv: {id: FrozenLake-v1}\nparams:\n  gamma: 2\n"
    )
    code, _, err = rlgen("run", str(bad), "--local", "--tracking-uri", f"sqlite:///{tmp_path}/x.db")
    assert code == 2
    assert f"{bad}:5: params.gamma: Input should be less than 1" in err.replace("\n", "")
    assert not (tmp_path / "x.db").exists()


def test_auto_is_checked_where_it_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--address auto` reads the last `ray start`'s address, which may be long dead: ray.init
    would wait on it for minutes (seen with a stale /tmp/ray/ray_current_cluster)."""
    from service import cluster

    port = _free_port()
    current = tmp_path / "ray_current_cluster"
    current.write_text(f"127.0.0.1:{port}\n")
    monkeypatch.setattr(cluster, "CURRENT_CLUSTER_FILE", current)
    with pytest.raises(ConnectionError, match=f"nothing answers at 127.0.0.1:{port}"):
        cluster.check_reachable("auto")
    current.unlink()  # no cluster was ever started here: ray.init says so itself
    cluster.check_reachable("auto")


def test_an_address_where_nothing_listens_exits_2_at_once(tmp_path: Path) -> None:
    """ray.init would retry an unreachable GCS for minutes; rlgen checks the port first."""
    port = _free_port()
    db = tmp_path / "x.db"
    t = time.monotonic()
    args = ["run", FROZEN, "--address", f"127.0.0.1:{port}", "--tracking-uri", f"sqlite:///{db}"]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"nothing answers at 127.0.0.1:{port}" in done.stderr.replace("\n", "")
    assert time.monotonic() - t < 60
    assert not db.exists()


def test_jobs_commands_against_a_cluster_that_does_not_answer_exit_2(in_tmp: Path) -> None:
    """A wrong --address is bad input, as for `rlgen run`: exit 2, and submit reports it before
    its warning about a SQLite store on the head node."""
    address = f"http://127.0.0.1:{_free_port()}"
    for args in (["submit", FROZEN], ["status"], ["list"], ["logs", "x"], ["cancel", "x"]):
        code, _, stderr = rlgen(*args, "--address", address)
        assert code == 2, (args, stderr)
        assert f"cannot reach the Ray Jobs API at {address}" in stderr.replace("\n", "")
        assert "warning" not in stderr


def test_spec_on_standard_input(tracking_uri: str, experiment_name: str, in_tmp: Path) -> None:
    text = Path(FROZEN).read_text()
    done = CliRunner().invoke(app, ["validate", "-"], input=text)
    assert done.exit_code == 0 and "name: frozenlake-dp" in done.stdout
    bad = CliRunner().invoke(app, ["run", "-"], input="name: t\nalgorithm: nope\n")
    assert bad.exit_code == 2 and "<stdin>:2: algorithm: unknown algorithm" in bad.stderr
    args = ["run", "-", "--local", "--json", *common(tracking_uri, experiment_name)]
    done = CliRunner().invoke(app, [*args, "--set", "seeds=[0]"], input=text)
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["trials"][0]["status"] == "FINISHED"


def test_schema_validate_and_algorithms_commands(tmp_path: Path) -> None:
    code, out, _ = rlgen("schema")
    assert code == 0 and json.loads(out)["title"] == "rlgen experiment spec"
    code, out, _ = rlgen("algorithms", "--json")
    listing = json.loads(out)
    assert listing["value_iteration"]["params"]["gamma"]["default"] == 0.99
    assert "Discount" in listing["value_iteration"]["params"]["gamma"]["description"]
    assert listing["dqn"]["params"]["hidden_sizes"]["type"] == "list[int]"
    assert listing["dqn"]["params"]["loss"]["type"] == "'huber' | 'mse'"
    code, out, _ = rlgen("algorithms")
    assert code == 0 and "policy_iteration" in out and "list[int]" in out
    code, out, _ = rlgen("validate", FROZEN, "--set", "params.gamma=0.5")
    assert code == 0 and "gamma: 0.5" in out and "max_iterations: 100000" in out


def test_brackets_in_messages_are_printed_as_written() -> None:
    """Rich reads `[word]` as markup: a value in brackets must not vanish from an error."""
    code, _, err = rlgen("validate", FROZEN, "--set", "report=[nope/metric]")
    assert code == 2 and "--set report=[nope/metric]: report[0]:" in err, err


# -- the real command, in its own process ---------------------------------------------------------
def cli_process(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_embedded_ray_from_the_command_line(tmp_path: Path) -> None:
    """What a new user runs: embedded Ray, ./mlflow.db, JSON on stdout, exit 0."""
    proc = cli_process(tmp_path, FROZEN, "--json", *FAST)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert len(result["trials"]) == 2 and all(t["status"] == "FINISHED" for t in result["trials"])
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()
    assert "INFO" not in err, err  # MLflow's start-up chatter stays out of the progress table


def wait_for_running(uri: str, name: str, timeout: float = 120) -> str:
    client = MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
            trials = [r for r in runs if "rlgen.seed" in r.data.tags]
            if trials:
                return str(trials[0].info.run_id)
        time.sleep(0.5)
    raise AssertionError("no trial started")


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                stat = (proc / "stat").read_text()
                parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def long_solve(uri: str, experiment_name: str, seeds: int) -> list[str]:
    """Arguments of a run whose trials stay RUNNING long enough to be interrupted mid-solve:
    10^6 states, ~3 s to build, then tens of seconds of sweeps. One seed: a single Ray task."""
    return [
        str(ROOT / "experiments" / "value_iteration_gridworld.yaml"),
        "--tracking-uri",
        uri,
        "--set",
        f"name={experiment_name}",
        "--set",
        "env.kwargs.size=1000",
        "--set",
        "params.tol=1e-300",
        "--set",
        "params.eval_episodes=1",
        "--set",
        f"seeds={list(range(seeds))}",
        "--set",
        "params.max_iterations=1000000",
    ]


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        ("--local", signal.SIGINT),
        ("--ray", signal.SIGINT),
        ("--ray-task", signal.SIGINT),
        # SIGTERM: `rlgen cancel` / `ray job stop`, a container stopping. In-process the command
        # died at once and its runs stayed RUNNING forever; on Ray they ended FAILED.
        ("--local", signal.SIGTERM),
        ("--ray", signal.SIGTERM),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v.strip("-"),
)
def test_interrupts_end_runs_killed(
    tmp_path: Path, mode: str, sig: signal.Signals, experiment_name: str
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    long_run = long_solve(uri, experiment_name, seeds=1 if mode == "--ray-task" else 2)
    proc = cli_process(tmp_path, *long_run, *([mode] if mode == "--local" else []))
    try:
        run_id = wait_for_running(uri, experiment_name)
        time.sleep(1.0)
        below = descendants(proc.pid)  # the embedded cluster's daemons and workers
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 30
    while (left := [p for p in below if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the command outlived it: {left}"
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    exp = client.get_experiment_by_name(experiment_name)
    assert exp is not None
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


@pytest.mark.parametrize("mode", ["--ray", "--local"], ids=lambda v: v.strip("-"))
def test_a_killed_command_leaves_no_run_running_and_no_process_behind(
    tmp_path: Path, mode: str, experiment_name: str
) -> None:
    """SIGKILL (the OOM killer, kill -9) lets the command end nothing itself: its watcher
    (service.watchdog) ends the runs FAILED, and stops the Ray agents that outlive their raylet."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = long_solve(uri, experiment_name, seeds=2)
    proc = cli_process(tmp_path, *args, *([mode] if mode == "--local" else []))
    try:
        wait_for_running(uri, experiment_name)
        time.sleep(1.0)
        below = descendants(proc.pid)
        proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name)
    assert exp is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = client.search_runs([exp.experiment_id])
        if all(r.info.status == "FAILED" for r in runs):
            break
        time.sleep(0.5)
    assert len(runs) >= 2, runs  # the parent and the trials started (one or two)
    assert all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]
    assert all("died before it ended this run" in r.data.tags["rlgen.error"] for r in runs)
    assert f"{len(runs)} run(s) left active ended FAILED" in err, err  # what the watcher did
    while (left := [p for p in below if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the command outlived it: {left}"


def test_evaluate_rolls_out_a_logged_policy_and_logs_a_gif(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    spec = str(ROOT / "experiments" / "dqn_cartpole.yaml")
    tiny = [
        "--set",
        "params.total_timesteps=600",
        "--set",
        "params.learning_starts=100",
        "--set",
        "params.eval_every=300",
        "--set",
        "params.eval_episodes=2",
        "--set",
        "seeds=[0]",
    ]
    out = run_json(
        spec, "--local", "--tracking-uri", tracking_uri, "--set", f"name={experiment_name}", *tiny
    )
    run_id = out["trials"][0]["run_id"]
    code, stdout, stderr = rlgen(
        "evaluate",
        run_id,
        "--episodes",
        "3",
        "--render",
        "gif",
        "--tracking-uri",
        tracking_uri,
        "--json",
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["episodes"] == 3 and result["gif"] == "videos/evaluate.gif"
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.data.metrics["evaluate/return_mean"] == pytest.approx(result["return_mean"])
    assert run.info.status == "FINISHED"  # evaluating does not reopen the run
    gif = Path(client.download_artifacts(run_id, "videos/evaluate.gif", str(in_tmp)))
    from PIL import Image

    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames >= 2  # a frame per step of episode 1

    # A tabular run's policy evaluates too (the solver logs it); the same run twice is stable.
    vi = run_json(FROZEN, "--local", *common(tracking_uri, experiment_name), "--set", "seeds=[0]")
    vi_id = vi["trials"][0]["run_id"]
    code, stdout, stderr = rlgen(
        "evaluate", vi_id, "--episodes", "50", "--tracking-uri", tracking_uri
    )
    assert code == 0, stderr
    assert "over 50 episodes" in stdout


def test_evaluate_renders_toy_text_envs_headless(
    tracking_uri: str,
    experiment_name: str,
    in_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """FrozenLake draws with pygame: SDL looked for a display and wrote 'error: XDG_RUNTIME_DIR
    is invalid' to the terminal (its own stderr, past Python), under a successful evaluation."""
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    vi = run_json(FROZEN, "--local", *common(tracking_uri, experiment_name), "--set", "seeds=[0]")
    code, stdout, stderr = rlgen(
        "evaluate", vi["trials"][0]["run_id"], "--episodes", "1", "--render", "gif",
        "--tracking-uri", tracking_uri,
    )  # fmt: skip
    assert code == 0, stderr
    assert "over 1 episode;" in stdout and "videos/evaluate.gif" in stdout
    assert "error" not in capfd.readouterr().err.lower()


def test_evaluate_refuses_what_it_cannot_evaluate(
    tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    code, _, stderr = rlgen("evaluate", "x", "--render", "mp4", "--tracking-uri", tracking_uri)
    assert code == 2 and "--render" in stderr
    spec = str(ROOT / "experiments" / "rbm_digits.yaml")
    tiny = [
        "--set",
        "params.epochs=1",
        "--set",
        "dataset.limit=200",
        "--set",
        "seeds=[0]",
        "--set",
        "params.ais.runs=2",
        "--set",
        "params.ais.temperatures=20",
    ]
    out = run_json(
        spec, "--local", "--tracking-uri", tracking_uri, "--set", f"name={experiment_name}", *tiny
    )
    code, _, stderr = rlgen("evaluate", out["trials"][0]["run_id"], "--tracking-uri", tracking_uri)
    assert code == 2 and "has no policy" in stderr
    code, _, stderr = rlgen(
        "evaluate", "0" * 32, "--tracking-uri", tracking_uri
    )  # the store exists
    assert code == 2 and "cannot read its spec.yaml" in stderr
    # A parent run holds no policy of its own: the error names its trials (it said "logged no
    # checkpoint (did it finish?)").
    sweep = run_json(FROZEN, "--local", *common(tracking_uri, experiment_name))
    code, _, stderr = rlgen("evaluate", sweep["parent_run_id"], "--tracking-uri", tracking_uri)
    stderr = stderr.replace("\n", "")
    assert code == 2 and "is the parent of several trials" in stderr
    assert all(f"{t['run_id']} ({t['trial']})" in stderr for t in sweep["trials"])


def test_the_progress_table_shows_the_experiments_own_metric_first() -> None:
    table = ProgressTable(["s0", "s1"], "sweep: vae", ["eval/neg_elbo"])
    # A trial that reached its end logged the headline eval/fid too; one stopped early did not.
    table.update("s0", "FINISHED", "r0", {"eval/fid": 190.0, "eval/neg_elbo": 36.5})
    table.update("s1", "KILLED", "r1", {"losses/loss": 50.0, "eval/fid": 210.0})
    assert table.rows["s0"]["result"] == "eval/neg_elbo = 36.5"
    assert table.rows["s1"]["result"] == "eval/fid = 210"  # the headline, when it lacks it
    plain = ProgressTable(["s0"], "dqn")
    plain.update("s0", "FINISHED", "r0", {"eval/return_mean": 500.0, "eval/x": 1.0})
    assert plain.rows["s0"]["result"] == "eval/return_mean = 500"
