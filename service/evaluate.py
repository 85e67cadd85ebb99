"""`rlgen evaluate`: load the policy a run logged, roll it out, and log the results to that run.

The run's `spec.yaml` names the algorithm, its config and the env; its newest checkpoint
(`checkpoints/step_*.pt`) holds the policy; the algorithm's `load_policy` turns the two into a
greedy policy. With `render="gif"` the first episode is recorded as `videos/evaluate.gif`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from agents.evaluation import evaluate_policy
from service.registry import ALGORITHMS
from service.spec import SpecError, load_spec_text
from service.store import client_for
from service.tracking import TAG_LAUNCH, TAG_SEED, TAG_TRIAL, runs_of_launch

log = logging.getLogger(__name__)

MAX_GIF_FRAMES = 1_000  # a 500-step CartPole episode is ~500 frames, ~1 MB of GIF


class EvaluateError(Exception):
    """The run cannot be evaluated (unknown run, no policy, not an RL run)."""


@dataclass
class Evaluation:
    run_id: str
    returns: np.ndarray  # (episodes,)
    lengths: np.ndarray  # (episodes,)
    gif: Path | None


def evaluate_run(
    run_id: str,
    tracking_uri: str,
    *,
    episodes: int = 10,
    seed: int = 0,
    render: str | None = None,
) -> Evaluation:
    client = client_for(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="rlgen-eval-") as tmp:
        workdir = Path(tmp)
        try:
            run = client.get_run(run_id)
            spec_file = client.download_artifacts(run_id, "spec.yaml", str(workdir))
        except (MlflowException, OSError) as e:
            raise EvaluateError(f"run {run_id}: cannot read its spec.yaml ({e})") from None
        try:
            spec = load_spec_text(Path(spec_file).read_bytes(), f"run {run_id}:spec.yaml")
        except SpecError as e:
            raise EvaluateError(str(e)) from None
        tags = run.data.tags
        if TAG_LAUNCH in tags and TAG_SEED not in tags:  # a sweep's (or seeds') parent run
            trials = runs_of_launch(client, run.info.experiment_id, tags[TAG_LAUNCH])
            ids = ", ".join(f"{r.info.run_id} ({r.data.tags.get(TAG_TRIAL)})" for r in trials)
            raise EvaluateError(
                f"run {run_id} is the parent of several trials; evaluate one of them: {ids}"
            )
        algo = ALGORITHMS[spec.algorithm]
        if algo.load_policy is None or getattr(spec, "env", None) is None:
            raise EvaluateError(f"run {run_id} is a {spec.algorithm} run, which has no policy")
        checkpoints = [
            f.path for f in client.list_artifacts(run_id, "checkpoints") if f.path.endswith(".pt")
        ]
        if not checkpoints:
            raise EvaluateError(f"run {run_id} logged no checkpoint (did it finish?)")
        local = client.download_artifacts(run_id, max(checkpoints), str(workdir))
        state = torch.load(local, map_location="cpu", weights_only=True)

        if render:  # off-screen frames: SDL (pygame, toy-text envs) must not look for a display
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        env = spec.env.make(evaluation=True, render_mode="rgb_array" if render else None)  # type: ignore[attr-defined]
        try:
            policy = algo.load_policy(spec.params, state, env)  # type: ignore[attr-defined]

            frames: list[np.ndarray] = []
            returns, lengths = evaluate_policy(
                env,
                one_at_a_time(policy),
                episodes,
                seed,
                frames=frames if render else None,
                max_frames=MAX_GIF_FRAMES,
            )
        finally:
            env.close()

        step = int(state.get("step", 0))
        now = int(time.time() * 1000)
        metrics = {
            "evaluate/return_mean": float(returns.mean()),
            "evaluate/return_std": float(returns.std()),
            "evaluate/length_mean": float(lengths.mean()),
            "evaluate/episodes": float(episodes),
        }
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        gif = None
        if frames:
            gif = workdir / "evaluate.gif"
            fps = int(env.metadata.get("render_fps") or 30)
            _write_gif(frames, gif, fps)
            client.log_artifact(run_id, str(gif), "videos")
            log.info("logged videos/evaluate.gif to run %s (%s)", run_id, run.info.run_name)
        return Evaluation(run_id, returns, lengths, Path("videos/evaluate.gif") if gif else None)


def one_at_a_time(policy: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An algorithm's policy (a batch of observations -> a batch of actions) as the rollout
    loop calls it: one observation -> one action. A batch of one is an array (1, *shape), or a
    list of one Tuple/Dict observation."""

    def act(obs: Any) -> Any:
        batch = [obs] if isinstance(obs, tuple | dict) else np.asarray(obs)[None]
        return policy(batch)[0].item()

    return act


def _write_gif(frames: list[np.ndarray], path: Path, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(20, round(1000 / fps)),
        loop=0,
        optimize=False,
    )
