"""What the embedded cluster's Ray workers import before they accept work.

`service.cluster.start_ray` names this module in Ray's `preload_python_modules`, so the workers
Ray prestarts (one per CPU) import torch and the algorithms (~1.5 s of CPU) while Ray and the
driver are still starting, instead of after a trial was handed to them.

Only as many as will run trials at once: `rlgen run` starts Ray before its spec is validated, and
says how many once it knows (`service.cluster.set_preload_workers`). The first worker preloads at
once; the others wait for the number (up to `WAIT_S`) and claim one of the slots it allows, or
stay light. On two cores a second worker importing for a single trial delays it by ~0.8 s; a
light worker imports on demand if a trial does come to it. What a worker preloaded, it then
freezes out of the garbage collector's reach (`service.trial.freeze_imports`).
"""

import os
import time

WAIT_S = 5.0  # what a worker waits for the driver to say how many preload; then it does


def _claim(directory: str, slot: int) -> bool:
    try:
        os.close(os.open(os.path.join(directory, f"slot{slot}"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _read_slots(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "slots")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def should_preload(directory: str | None) -> bool:
    if directory is None or not os.path.isdir(directory):
        return True  # not the embedded cluster's driver asking: preload
    deadline = time.monotonic() + WAIT_S
    while (slots := _read_slots(directory)) is None:
        if _claim(directory, 0):
            return True  # the first worker never waits
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return any(_claim(directory, i) for i in range(slots))


if should_preload(os.environ.get("RLGEN_PRELOAD_DIR")):
    # Not MLflow: on this cluster trials reach it through the driver (`service.relay`).
    import service.trial  # (torch, the algorithms, the run context)

    service.trial.freeze_imports()  # what it imported, out of the garbage collector's way
