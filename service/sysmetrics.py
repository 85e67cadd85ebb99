"""A trial's CPU, memory and GPU use over time, as MLflow system metrics.

MLflow's UI shows metrics named `system/...` in each run's "System metrics" tab; the names are
those of MLflow's own system-metrics monitor, so its charts and any tooling that reads them work
unchanged. rlgen samples them in the trial's process, on a thread of its own, and hands them to
the run's buffered metric writer (the same batches, retries and relay as every other metric),
instead of MLflow's monitor, which would open a second connection to the tracking store from
every worker.

GPU utilisation needs NVML (`pip install 'rlgen[gpu]'`, nvidia-ml-py); without it, a CUDA
trial still records its GPU's memory through torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import psutil
import torch

log = logging.getLogger(__name__)

MB = 1024**2


def _nvml(index: int) -> Any | None:
    """An NVML handle for the GPU at `index`, or None without NVML."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # not installed, no driver, no such device
        return None


class SystemMonitor:
    """Samples every `interval_s` seconds and passes `{name: value}, step` to `log`; steps
    count samples from `first_step` (a restarted trial continues its run's count)."""

    def __init__(
        self,
        log_fn: Callable[[Mapping[str, float], int], None],
        interval_s: float,
        device: torch.device,
        first_step: int = 1,
    ):
        self.log_fn, self.interval_s, self.step = log_fn, interval_s, first_step
        self.process = psutil.Process()
        self.gpu = (device.index or 0) if device.type == "cuda" else None
        self.nvml = _nvml(self.gpu) if self.gpu is not None else None
        if self.gpu is not None and self.nvml is None:
            log.info("GPU utilisation needs NVML: pip install 'rlgen[gpu]' (memory is recorded)")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rlgen-sysmetrics", daemon=True)
        psutil.cpu_percent()  # the first call starts psutil's measurement interval
        self.process.cpu_percent()

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        out = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(),
            "system/system_memory_usage_megabytes": (memory.total - memory.available) / MB,
            "system/system_memory_usage_percentage": memory.percent,
            # The trial's own process: what this trial uses of a node it may share.
            "system/process_cpu_utilization_percentage": self.process.cpu_percent(),
            "system/process_memory_rss_megabytes": self.process.memory_info().rss / MB,
        }
        if self.gpu is not None:
            g = f"system/gpu_{self.gpu}"
            if self.nvml is not None:
                import pynvml

                rates = pynvml.nvmlDeviceGetUtilizationRates(self.nvml)
                info = pynvml.nvmlDeviceGetMemoryInfo(self.nvml)
                out[f"{g}_utilization_percentage"] = float(rates.gpu)
                out[f"{g}_memory_usage_megabytes"] = info.used / MB
                out[f"{g}_memory_usage_percentage"] = 100.0 * info.used / info.total
            else:
                free, total = torch.cuda.mem_get_info(self.gpu)
                out[f"{g}_memory_usage_megabytes"] = (total - free) / MB
                out[f"{g}_memory_usage_percentage"] = 100.0 * (total - free) / total
            # What PyTorch's allocator holds, of that: a trial that shares its GPU sees its own.
            reserved = torch.cuda.memory_reserved(self.gpu)
            out[f"{g}_process_memory_reserved_megabytes"] = reserved / MB
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.record()

    def record(self) -> None:
        try:
            self.log_fn(self.sample(), self.step)
            self.step += 1
        except Exception as e:  # monitoring must never fail a trial
            log.warning("system metrics not sampled: %s", e)

    def __enter__(self) -> SystemMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.record()  # the last sample, at the end of the trial
