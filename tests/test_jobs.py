"""`rlgen submit`'s Ray Jobs client: what reaches the Jobs API."""

from __future__ import annotations

import inspect
import shlex
from typing import Any

import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from service import __version__
from service.jobs import ENTRY, PROBE, SPEC_VAR, Jobs, JobsError
from service.spec import load_spec

from .conftest import ROOT


class RecordingClient:
    """The Jobs API of a cluster whose head runs `rlgen --version` as `probe` says."""

    def __init__(self, probe: tuple[str, str] = ("SUCCEEDED", f"rlgen {__version__}\n")) -> None:
        self.calls: list[dict[str, Any]] = []
        self.probes = 0
        self.probe = probe

    def submit_job(self, **kwargs: Any) -> str:
        if kwargs["entrypoint"] == PROBE:
            self.probes += 1
            return "raysubmit_probe"
        self.calls.append(kwargs)
        return "raysubmit_1"

    def get_job_status(self, job_id: str) -> str:
        return self.probe[0]

    def get_job_logs(self, job_id: str) -> str:
        return self.probe[1]


def jobs_with(client: RecordingClient) -> Jobs:
    jobs = Jobs.__new__(Jobs)  # no cluster to connect to
    jobs.address, jobs.client = "http://head:8265", client  # type: ignore[assignment]
    return jobs


def test_submit_sends_the_spec_and_the_driver_resources() -> None:
    spec = load_spec(
        ROOT / "experiments" / "dqn_cartpole.yaml",
        ["driver.num_cpus=0.5", "driver.num_gpus=1", "driver.resources={head: 1}"],
    )
    client = RecordingClient()
    assert jobs_with(client).submit(spec, "http://mlflow:5000") == "raysubmit_1"
    (call,) = client.calls
    assert call["entrypoint"] == f"{ENTRY} --tracking-uri {shlex.quote('http://mlflow:5000')}"
    assert call["entrypoint_num_cpus"] == 0.5
    assert call["entrypoint_num_gpus"] == 1
    assert call["entrypoint_resources"] == {"head": 1.0}
    sent = yaml.safe_load(call["runtime_env"]["env_vars"][SPEC_VAR])
    assert sent["name"] == spec.name and sent["seeds"] == spec.seeds
    assert call["metadata"] == {"rlgen.name": spec.name, "rlgen.algorithm": "dqn"}


def test_driver_reserves_nothing_by_default() -> None:
    spec = load_spec(ROOT / "experiments" / "dqn_cartpole.yaml")
    client = RecordingClient()
    jobs_with(client).submit(spec, "http://mlflow:5000")
    (call,) = client.calls
    assert call["entrypoint_num_cpus"] == 0 and call["entrypoint_num_gpus"] == 0
    assert call["entrypoint_resources"] is None


def test_the_jobs_api_takes_these_arguments() -> None:
    params = inspect.signature(JobSubmissionClient.submit_job).parameters
    for name in ("entrypoint", "runtime_env", "metadata", "entrypoint_num_cpus",
                 "entrypoint_num_gpus", "entrypoint_resources"):  # fmt: skip
        assert name in params, name


def test_the_cluster_is_asked_once_whether_it_runs_this_rlgen() -> None:
    spec = load_spec(ROOT / "experiments" / "dqn_cartpole.yaml")
    client = RecordingClient()
    jobs = jobs_with(client)
    jobs.submit(spec, "http://mlflow:5000")
    jobs.submit(spec, "http://mlflow:5000")
    assert client.probes == 1 and len(client.calls) == 2


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (
            ("FAILED", "/bin/sh: 1: rlgen: not found\n"),
            "cannot run rlgen (`rlgen --version`: /bin/sh",
        ),
        (("SUCCEEDED", "rlgen 0.0.1\n"), "the cluster runs rlgen 0.0.1, this is rlgen"),
    ],
)
def test_a_cluster_without_this_rlgen_is_refused_before_submitting(
    probe: tuple[str, str], message: str
) -> None:
    spec = load_spec(ROOT / "experiments" / "dqn_cartpole.yaml")
    client = RecordingClient(probe)
    with pytest.raises(JobsError, match="install rlgen") as info:
        jobs_with(client).submit(spec, "http://mlflow:5000")
    assert message in str(info.value)
    assert client.calls == []  # nothing submitted
