"""What the embedded cluster's Ray workers import before they accept work.

`service.cluster.start_ray` names this module in Ray's `preload_python_modules`, so the workers
Ray prestarts import torch, the algorithms and MLflow's SQLite store (~3 s of CPU) while Ray
and the driver are still starting, instead of after a trial was handed to them.
"""

import mlflow.store.tracking.sqlalchemy_store  # what every trial opens on SQLite
import mlflow.tracking  # noqa: F401

import service.trial  # noqa: F401  (torch, the algorithms, the run context)
