"""System metrics: each trial run records its CPU and memory use over time (GPU where present)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from runctx.metrics import MetricLogger
from runctx.writers import InMemoryWriter
from service.execution import launch
from service.spec import load_spec
from service.sysmetrics import SystemMonitor

SPEC = """\
name: {name}
algorithm: q_learning
env: {{id: FrozenLake-v1, kwargs: {{is_slippery: false}}}}
params: {{total_timesteps: 60000, eval_every: 30000, eval_episodes: 5}}
resources: {{system_metrics_s: {interval}}}
"""


def test_the_monitor_samples_on_its_own_thread_and_counts_on() -> None:
    points: list[tuple[dict[str, float], int]] = []
    with SystemMonitor(lambda m, s: points.append((dict(m), s)), 0.05, torch.device("cpu"), 7):
        time.sleep(0.4)
    assert len(points) >= 4  # ~8 on the thread, and one at the end
    assert [s for _, s in points] == list(range(7, 7 + len(points)))
    cores = psutil.cpu_count() or 1
    for metrics, _ in points:
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
        assert 0 <= metrics["system/process_cpu_utilization_percentage"] <= 100 * cores
        assert metrics["system/process_memory_rss_megabytes"] > 0
        assert metrics["system/system_memory_usage_megabytes"] > 0
        assert not any("gpu" in k for k in metrics)  # a CPU trial has no GPU metrics


def test_side_points_are_written_but_not_reported_as_results() -> None:
    writer, heard = InMemoryWriter(), []
    logger = MetricLogger(writer, on_log=lambda m, s, _: heard.append(m), background=False)
    logger.log_side({"system/cpu_utilization_percentage": 12.0}, 3)
    logger.log({"losses/x": 1.0}, 5)
    logger.close()
    assert writer.metrics["system/cpu_utilization_percentage"] == [(3, 12.0)]
    assert heard == [{"losses/x": 1.0}] and "system/cpu_utilization_percentage" not in logger.last


@pytest.mark.parametrize("interval", [0.1, 0])
def test_trial_runs_have_system_metrics_unless_switched_off(
    interval: float, tracking_uri: str, experiment_name: str, in_tmp: Path
) -> None:
    path = in_tmp / "spec.yaml"
    path.write_text(SPEC.format(name=experiment_name, interval=interval))
    report = launch(load_spec(path), mode="local", tracking_uri=tracking_uri)
    assert report.ok
    client = MlflowClient(tracking_uri)
    (trial,) = report.trials
    history = client.get_metric_history(trial.run_id, "system/cpu_utilization_percentage")
    if interval:
        # A curve over the trial's time (steps 1, 2, ...), which the UI's System metrics tab draws.
        assert len(history) >= 2, history
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1))
        rss = client.get_metric_history(trial.run_id, "system/process_memory_rss_megabytes")
        assert len(rss) == len(history) and all(m.value > 0 for m in rss)
    else:
        assert history == []
