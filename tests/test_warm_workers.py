"""The embedded cluster's workers are warm: they import what trials need while Ray starts
(`service.preload`), and trials, a single one (a Ray task) or several (Ray Tune actors), run in
those prestarted workers instead of fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import ROOT

# This cluster's idle workers (Linux: /proc), and whether each has libtorch mapped. Ray names a
# worker process `ray::IDLE` until it runs something; ours are the children of the raylet this
# process started (another Ray may run on this machine).
IDLE_WORKERS = r"""
def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def idle_workers() -> dict[int, bool]:
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "cmdline").read_bytes().startswith(b"ray::IDLE")
                and parent(parent(int(proc.name))) == os.getpid()
            ):
                found[int(proc.name)] = b"libtorch" in (proc / "maps").read_bytes()
        except (OSError, ValueError, IndexError):
            pass
    return found


def wait_for_idle(count: int, timeout: float = 60.0) -> dict[int, bool]:
    deadline = time.monotonic() + timeout
    while len(found := idle_workers()) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return found
"""


def embedded_script(body: str, imports: str = "", start: str = "start_ray(num_cpus=2)") -> str:
    """A script for a fresh process (the test session's own Ray is not the embedded cluster
    `start_ray` makes): `imports`, the embedded cluster, the idle-worker helpers, then `body`."""
    head = "import json, os, sys, time\nfrom pathlib import Path\n\nimport ray\n"
    return (
        f"{head}{imports}\nfrom service.cluster import start_ray\n\n{start}\n{IDLE_WORKERS}{body}"
    )


SCRIPT = embedded_script(
    imports="from mlflow.tracking import MlflowClient\n\nfrom service.cluster import embedded\n"
    "from service.execution import launch\nfrom service.spec import load_spec\n",
    body=r"""
idle = wait_for_idle(2)


@ray.remote(num_cpus=0)
def imported() -> list[bool]:
    # Nothing here imports rlgen: what the worker has, it preloaded.
    return [m in sys.modules for m in ("torch", "service.trial", "mlflow.tracking")]


@ray.remote(num_cpus=0)
def frozen() -> int:
    import gc

    return gc.get_freeze_count()


def loaded(pid: int, library: str) -> bool:
    return library.encode() in Path(f"/proc/{pid}/maps").read_bytes()


warm = ray.get(imported.remote())
freeze_count = ray.get(frozen.remote())
client = MlflowClient(f"sqlite:///{sys.argv[2]}")
workers = {}
for seeds in ("[0]", "[0, 1]"):  # one trial: a Ray task; two: Ray Tune
    spec = load_spec(sys.argv[1], [f"seeds={seeds}", "params.eval_episodes=5"])
    report = launch(spec, mode="ray", tracking_uri=f"sqlite:///{sys.argv[2]}")
    workers[seeds] = [
        int(client.get_run(t.run_id).data.tags["rlgen.worker"].rsplit(":", 1)[1])
        for t in report.trials
        if t.status == "FINISHED"
    ]
# MLflow's SQLite store brings SQLAlchemy's compiled modules: in this process, not in the single
# trial's worker (it stays; Tune's trial actors are gone by now).
sqlalchemy = {pid: loaded(pid, "sqlalchemy") for pid in [os.getpid(), *workers["[0]"]]}
print(json.dumps({"embedded": embedded(), "idle": sorted(idle), "warm": warm, "workers": workers,
                  "sqlalchemy": sqlalchemy, "frozen": freeze_count}))
""",
)


def test_trials_run_in_prestarted_preloaded_workers(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(ROOT / "experiments" / "value_iteration_frozenlake.yaml"),
            str(tmp_path / "mlflow.db"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["embedded"] is True
    assert len(result["idle"]) == 2, result
    # torch and the algorithms, but not MLflow: trials reach it through the driver's relay.
    assert result["warm"] == [True, True, False]
    assert result["frozen"] > 100_000  # what it preloaded, out of the garbage collector's way
    driver, *trial_workers = result["sqlalchemy"].values()
    assert driver is True and trial_workers == [False], result
    assert len(result["workers"]["[0]"]) == 1 and len(result["workers"]["[0, 1]"]) == 2
    idle = set(result["idle"])
    assert set(result["workers"]["[0]"]) <= idle, result  # the task: no fresh worker process
    # Tune's actors too. Two things used to send them to fresh processes: Tune's per-actor
    # runtime_env (tested below), and, in ~1 run in 5, Ray retiring both idle warm workers in
    # the moment between Tune reserving the trials' CPUs and its actors taking workers (Ray
    # keeps idle workers up to the *available* CPUs; raylet.out: "Disconnecting worker ...
    # job_id=NIL_ID", the worker's log: "exited because it was idle for a long time").
    assert set(result["workers"]["[0, 1]"]) <= idle, result


RESERVED = embedded_script(
    imports="from ray.util.placement_group import placement_group\n",
    body=r"""
before = wait_for_idle(2)
pg = placement_group([{"CPU": 1}, {"CPU": 1}])  # what Tune reserves before its actors start
ray.get(pg.ready())
time.sleep(3)  # Ray's reaper looks every 0.2 s for workers idle over 1 s
print(json.dumps({"before": sorted(before), "after": sorted(idle_workers())}))
""",
)


def test_warm_workers_outlive_reserved_cpus(tmp_path: Path) -> None:
    """With every CPU reserved, Ray retired the idle warm workers (it keeps as many as there are
    available CPUs); the embedded cluster keeps them for the trials that reserved the CPUs."""
    out = subprocess.run(
        [sys.executable, "-c", RESERVED], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["before"]) == 2 and result["after"] == result["before"], result


def test_tune_trial_actors_carry_no_runtime_env_of_their_own() -> None:
    from ray.tune.execution import class_cache

    from service.tuning import _trial_actors_on_prestarted_workers

    saved = class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE
    assert saved[0] or saved[1]  # Tune's defaults: variables it would put in each actor's env
    with _trial_actors_on_prestarted_workers():
        inside = class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE
    after = class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE
    assert inside == ({}, set()) and after == saved


# -- how many preload ----------------------------------------------------------------------------
def test_only_as_many_workers_preload_as_the_driver_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import preload
    from service.cluster import PRELOAD_DIR_ENV, set_preload_workers

    assert preload.should_preload(None)  # not the embedded cluster's: preload
    one = tmp_path / "one"
    one.mkdir()
    monkeypatch.setenv(PRELOAD_DIR_ENV, str(one))
    set_preload_workers(1)  # a single trial
    assert [preload.should_preload(str(one)) for _ in range(3)] == [True, False, False]
    # Not said yet: the first worker preloads at once, the next waits for the number...
    later = tmp_path / "later"
    later.mkdir()
    monkeypatch.setenv(PRELOAD_DIR_ENV, str(later))
    assert preload.should_preload(str(later))
    threading.Timer(0.3, set_preload_workers, [2]).start()  # a sweep of two at once
    t = time.monotonic()
    assert preload.should_preload(str(later)) and time.monotonic() - t >= 0.25
    assert not preload.should_preload(str(later))
    # ... but not forever: never said, every worker preloads.
    never = tmp_path / "never"
    never.mkdir()
    monkeypatch.setattr(preload, "WAIT_S", 0.2)
    assert preload.should_preload(str(never)) and preload.should_preload(str(never))


LIGHT = embedded_script(
    start="start_ray(num_cpus=2, preload_workers=1)",
    body=r"""
deadline = time.monotonic() + 90
while sum(idle_workers().values()) < 1 and time.monotonic() < deadline:
    time.sleep(0.2)
time.sleep(5)  # the light one decided long ago: it stays light
print(json.dumps(idle_workers()))
""",
)


def test_a_single_trial_cluster_preloads_one_worker(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", LIGHT], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(loaded.values()) == [False, True], loaded  # two prestarted, one preloaded


@pytest.mark.usefixtures("ray_cluster")
def test_the_embedded_cluster_leaves_out_the_daemons_it_has_no_use_for() -> None:
    from service.cluster import embedded_session_dir
    from service.guard import cluster_processes

    session_dir = embedded_session_dir()
    assert session_dir is not None
    cmdlines = [cmdline for _, cmdline in cluster_processes(session_dir)]
    # Found the cluster: its GCS, raylet and the agents the raylet needs are there ...
    for needed in (b"/gcs_server", b"/raylet", b"ray::DashboardAgent", b"ray::RuntimeEnvAgent"):
        assert any(needed in cmdline for cmdline in cmdlines), (needed, cmdlines)
    # ... but not the autoscaler's monitor, the log monitor nor the API server.
    for left_out in (b"/monitor.py", b"/log_monitor.py", b"/dashboard.py"):
        assert not any(left_out in cmdline for cmdline in cmdlines), (left_out, cmdlines)


@pytest.mark.usefixtures("ray_cluster")
def test_the_embedded_cluster_runs_with_its_settings() -> None:
    from ray._private.state import state

    from service.cluster import EMBEDDED_SYSTEM_CONFIG

    # What the GCS handed the raylet: workers prestarted at its start and never retired.
    config = state.get_system_config()
    assert config["enable_worker_prestart"] is True
    assert config["kill_idle_workers_interval_ms"] == 0
    assert config["preload_python_modules"] == ["service.preload"]
    assert EMBEDDED_SYSTEM_CONFIG.items() <= config.items()


# -- the garbage collector -----------------------------------------------------------------------
def test_ray_workers_freeze_their_imports_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single trial's task and a Tune trial each freeze what their worker imported, once per
    process; running a trial in-process (`run_trial`, `--local`) freezes nothing."""
    import ray
    from ray import tune

    from service import trial, tuning

    calls: list[int] = []
    monkeypatch.setattr(trial.gc, "freeze", lambda: calls.append(1))
    monkeypatch.setattr(trial, "_imports_frozen", False)
    outcome = trial.TrialOutcome("run", 0, "FINISHED")
    monkeypatch.setattr(trial, "run_trial", lambda *a, **k: outcome)
    monkeypatch.setattr(tuning, "run_trial", lambda *a, **k: outcome)
    monkeypatch.setattr(tune, "report", lambda *a, **k: None)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # not on a worker: no Ray to ask
    request = trial.TrialRequest(spec={}, seed=0, tracking_uri="", experiment_id="0", launch_id="")

    assert trial.run_on_ray_worker(request) is outcome
    assert calls == [1]
    trial.run_on_ray_worker(request)  # the same worker again: frozen already
    assert calls == [1]
    monkeypatch.setattr(trial, "_imports_frozen", False)  # a fresh worker process, under Tune
    tuning._trainable({"trial": {"seed": 0, "overrides": {}}}, request, None)
    assert calls == [1, 1]
