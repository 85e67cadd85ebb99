"""The run context: what an algorithm's `train(config, ctx)` receives besides its config.

This package sits below both sides of rlgen. `agents/` and `generative/` import it to log, draw
random numbers, checkpoint and notice stop requests; `service/` builds a `RunContext` whose writer
is MLflow. It imports neither Ray, MLflow nor FastAPI, nor anything of `service/`, `agents/` or
`generative/`, so every algorithm runs and is tested in-process against `RunContext.in_memory()`.
"""

from runctx.checkpoints import Checkpointer
from runctx.context import EnvFactory, RunContext, scheduled_once
from runctx.metrics import MetricLogger
from runctx.points import MetricPoint, name_problem
from runctx.timer import TrainTimer
from runctx.writers import InMemoryWriter, RejectedError, Writer

__all__ = [
    "Checkpointer",
    "EnvFactory",
    "InMemoryWriter",
    "MetricLogger",
    "MetricPoint",
    "RejectedError",
    "RunContext",
    "TrainTimer",
    "Writer",
    "name_problem",
    "scheduled_once",
]
