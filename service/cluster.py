"""Starting or joining Ray, kept light: `rlgen run` starts Ray while another thread imports the
algorithms, so this module imports nothing of rlgen's.
"""

from __future__ import annotations

import logging
import os

import ray

# Set before Ray starts: its workers inherit this environment.
# Tune's own CSV/JSON/TensorBoard loggers duplicate what MLflow records; its SIGINT handler would
# swallow Ctrl-C, which we handle ourselves (runs end KILLED).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Trials keep the job's working directory instead of moving into a Tune trial directory, which
# on another node may not exist (or be cleaned up under a running trial); MLflow holds the files.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")


def start_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start an embedded one; idempotent.

    Call it from the main thread: Ray ties its daemons' lives to the thread that started them.
    """
    if not ray.is_initialized():
        ray.init(
            # Embedded means a fresh local Ray, even when `ray start` left a cluster on this
            # machine; RAY_ADDRESS (or --address) is how to join one.
            address=address or os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
        # Tune looks for the result files of the loggers we disabled; MLflow has the results.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
