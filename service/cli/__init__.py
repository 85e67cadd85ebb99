"""`rlgen`: run, validate and inspect experiments; submit them to a cluster; serve the API.

One module per group of commands (`experiments`, `jobs`), the shared options and spec loading in
`app`, the progress table in `progress`.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from typing import Any

from service.cli import experiments, jobs  # noqa: F401  (registers the commands)
from service.cli.app import app
from service.cli.progress import ProgressTable

__all__ = ["ProgressTable", "app", "main"]


def main() -> None:
    """The `rlgen` command."""

    def terminate(signum: int, frame: Any) -> None:
        # SIGTERM unwinds like Ctrl-C: `run` ends its runs KILLED (service.execution installs
        # its own handler while trials run) and an embedded Ray cluster is shut down below,
        # instead of dying on the spot with the cluster and its trials left running.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        app()
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        logging.shutdown()
        # The interpreter's last garbage collections would traverse every object torch, MLflow
        # and Ray created (~1 s on a small machine) only to free memory the process gives back
        # anyway; exit handlers and finalizers still run.
        gc.freeze()
