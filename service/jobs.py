"""Remote submission: an experiment becomes a Ray Job on a cluster (the Jobs API on the head's
dashboard port, 8265), so the laptop that submitted it can close.

The resolved spec travels in the job's environment (`RLGEN_SPEC_YAML`; specs are a few kB); the
entrypoint `rlgen run --spec-env RLGEN_SPEC_YAML --address auto` runs in the head node's Python
(where rlgen is installed, as in the Dockerfile's image; the spec's `driver` resources can place
it elsewhere), so the trials go to the cluster's workers and log to the tracking server given
here. The spec is validated before
anything is submitted.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from service.spec import SpecBase, to_yaml

SPEC_VAR = "RLGEN_SPEC_YAML"
ENTRY = f"rlgen run --spec-env {SPEC_VAR} --address auto --json"


@dataclass
class JobInfo:
    id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    name: str
    algorithm: str
    message: str
    start_time: float | None
    end_time: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobsError(Exception):
    """The cluster cannot be reached, or refused the request."""


class Jobs:
    """Ray Jobs API client for rlgen experiments on one cluster (`http://HEAD:8265`)."""

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        try:
            self.client = JobSubmissionClient(address)
        except Exception as e:  # ConnectionError, ValueError for malformed addresses
            raise JobsError(f"cannot reach the Ray Jobs API at {address}: {e}") from None

    def submit(self, spec: SpecBase, tracking_uri: str) -> str:
        # The spec travels in the job's environment, not in a `working_dir` package: the Ray
        # runtime-env agent may garbage-collect an unreferenced package under a starting driver.
        entrypoint = f"{ENTRY} --tracking-uri {shlex.quote(tracking_uri)}"
        try:
            job_id: str = self.client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"env_vars": {SPEC_VAR: to_yaml(spec)}},
                metadata={"rlgen.name": spec.name, "rlgen.algorithm": spec.algorithm},
                entrypoint_num_cpus=spec.driver.num_cpus,
                entrypoint_num_gpus=spec.driver.num_gpus,
                entrypoint_resources=spec.driver.resources or None,
            )
        except Exception as e:
            raise JobsError(f"the cluster refused the job: {e}") from None
        return job_id

    def info(self, job_id: str) -> JobInfo:
        try:
            details = self.client.get_job_info(job_id)
        except Exception as e:
            raise JobsError(f"no job {job_id}: {e}") from None
        return _info(details)

    def list(self) -> list[JobInfo]:
        jobs = [_info(d) for d in self.client.list_jobs() if (d.metadata or {}).get("rlgen.name")]
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def logs(self, job_id: str) -> str:
        try:
            return str(self.client.get_job_logs(job_id))
        except Exception as e:
            raise JobsError(f"no logs for job {job_id}: {e}") from None

    def cancel(self, job_id: str) -> bool:
        try:
            return bool(self.client.stop_job(job_id))
        except Exception as e:
            raise JobsError(f"cannot stop job {job_id}: {e}") from None


def _info(details: Any) -> JobInfo:
    meta = details.metadata or {}
    return JobInfo(
        id=details.submission_id or details.job_id,
        status=str(getattr(details.status, "value", details.status)),
        name=meta.get("rlgen.name", ""),
        algorithm=meta.get("rlgen.algorithm", ""),
        message=details.message or "",
        start_time=details.start_time / 1000 if details.start_time else None,
        end_time=details.end_time / 1000 if details.end_time else None,
    )
