"""What the API answers: one response model per route, so `/docs` shows every schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(description="'ok' while the service answers.")


class Submitted(BaseModel):
    id: str = Field(description="The experiment's id in this service.")
    job_id: str = Field(description="Its Ray Job's submission id.")
    status: str = Field(description="PENDING: the job was handed to the cluster.")
    url: str = Field(description="Where to follow it: GET this path.")


class ExperimentSummary(BaseModel):
    id: str = Field(description="The experiment's id in this service.")
    job_id: str = Field(description="Its Ray Job's submission id.")
    name: str = Field(description="The spec's name: the MLflow experiment.")
    algorithm: str = Field(description="The spec's algorithm.")
    created: float = Field(description="Submission time, seconds since the epoch.")
    status: str = Field(
        description="The Ray Job's status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, or "
        "UNKNOWN when the cluster cannot be asked."
    )
    message: str = Field(description="The cluster's word on the status, or why it is unknown.")


class Run(BaseModel):
    run_id: str = Field(description="The MLflow run id.")
    name: str | None = Field(description="The MLflow run name.")
    status: str = Field(description="RUNNING, FINISHED, FAILED or KILLED.")
    trial: str | None = Field(description="The trial's label (seed and swept values).")
    metrics: dict[str, float] = Field(description="The run's latest value of each metric.")
    url: str = Field(description="The run in the MLflow UI.")


class ExperimentDetail(ExperimentSummary):
    runs: list[Run] = Field(description="The experiment's MLflow runs (the parent included).")
    runs_error: str | None = Field(
        None, description="Why the runs could not be read (the tracking store is unreachable)."
    )


class ContinueRequest(BaseModel):
    set: list[str] = Field(
        default_factory=list,
        description="Budget overrides, as `rlgen continue --set`: params.total_timesteps=200000.",
    )


class Cancelled(BaseModel):
    id: str = Field(description="The experiment's id.")
    stopping: bool = Field(description="False when the job had ended already.")
