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
import time
from dataclasses import dataclass
from typing import Any

from service import __version__
from service.spec import SpecBase, to_yaml

SPEC_VAR = "RLGEN_SPEC_YAML"
ENTRY = f"rlgen run --spec-env {SPEC_VAR} --address auto --json"
PROBE = "rlgen --version"  # a job that shows whether, and at which version, the head runs rlgen
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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

    rlgen_checked = False  # the cluster showed it runs this rlgen (`check_rlgen`), once

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        try:
            self.client = JobSubmissionClient(address)
        except Exception as e:  # ConnectionError, ValueError for malformed addresses
            raise JobsError(f"cannot reach the Ray Jobs API at {address}: {e}") from None

    def check_rlgen(self, timeout_s: float = 120.0) -> None:
        """Raise JobsError unless the cluster's head can run `rlgen` at this version: a job's
        driver is `rlgen run` on the head's PATH, and without this check a missing or other
        rlgen shows only as `/bin/sh: rlgen: not found` in a failed job's log. Asked with one
        small job (`rlgen --version`), once per client."""
        if self.rlgen_checked:
            return
        try:
            job_id = self.client.submit_job(entrypoint=PROBE, metadata={"rlgen.probe": "1"})
            deadline = time.monotonic() + timeout_s
            while (status := self._status(job_id)) not in TERMINAL:
                if time.monotonic() > deadline:
                    raise JobsError(f"`{PROBE}` did not finish on the cluster in {timeout_s:.0f} s")
                time.sleep(0.25)
            output = str(self.client.get_job_logs(job_id)).strip()
        except JobsError:
            raise
        except Exception as e:
            raise JobsError(f"cannot ask the cluster whether it runs rlgen: {e}") from None
        last = output.splitlines()[-1] if output else "(no output)"
        fix = (
            f"install rlgen {__version__} on the head node, on the PATH of the process that "
            "ran `ray start` (the Dockerfile's image has it)"
        )
        if status != "SUCCEEDED":
            raise JobsError(f"the cluster's head cannot run rlgen (`{PROBE}`: {last}); {fix}")
        theirs = last.split()[-1]
        if theirs != __version__:
            raise JobsError(f"the cluster runs rlgen {theirs}, this is rlgen {__version__}; {fix}")
        self.rlgen_checked = True

    def _status(self, job_id: str) -> str:
        status = self.client.get_job_status(job_id)
        return str(getattr(status, "value", status))

    def submit(self, spec: SpecBase, tracking_uri: str) -> str:
        self.check_rlgen()
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
