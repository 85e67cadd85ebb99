"""Exact resume, for every algorithm in the registry: a run that dies right after a checkpoint and
is resumed from it ends with the same metrics and parameters as the run that never stopped.

Each case trains three times in-process: uninterrupted; again, dying (an exception from the
writer) when its `crash_after`-th checkpoint is written; and resumed from that checkpoint in the
same directory. The resumed run must not log anything at or before the checkpoint's step: an
algorithm that ignored its checkpoint and started over would (and would otherwise go unnoticed,
since it would reproduce the same numbers from the seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.envs import EnvSpec
from runctx import InMemoryWriter, RunContext
from service.registry import ALGORITHMS

# algorithm -> (env or None, params, which checkpoint the first attempt dies after)
CASES: dict[str, tuple[EnvSpec | None, dict[str, Any], int]] = {
    "value_iteration": (
        EnvSpec(id="FrozenLake-v1", kwargs={"map_name": "8x8"}),
        {"tol": 1e-10, "checkpoint_every": 10, "eval_episodes": 5, "figures": False},
        2,
    ),
    "policy_iteration": (
        EnvSpec(id="FrozenLake-v1", kwargs={"map_name": "8x8"}),
        {"evaluation": "iterative", "checkpoint_every": 1, "eval_episodes": 5, "figures": False},
        2,
    ),
    "q_learning": (
        EnvSpec(id="FrozenLake-v1"),
        {
            "total_timesteps": 4_000,
            "checkpoint_every": 1_500,
            "eval_every": 1_000,
            "eval_episodes": 5,
            "update": "sarsa",
        },
        1,
    ),
    "dqn": (
        EnvSpec(id="CartPole-v1"),
        {
            "total_timesteps": 3_000,
            "num_envs": 2,
            "learning_starts": 300,
            "train_freq": 100,
            "gradient_steps": 8,
            "batch_size": 32,
            "hidden_sizes": [32],
            "n_step": 3,
            "prioritized_replay": True,
            "double_dqn": True,
            "target_update_interval": 16,
            "log_every": 8,
            "eval_every": 1_000,
            "eval_episodes": 2,
            "checkpoint_every": 1_100,
            "checkpoint_buffer": True,
        },
        1,
    ),
    "ppo": (
        EnvSpec(id="CartPole-v1"),
        {
            "total_timesteps": 2_048,
            "num_envs": 2,
            "num_steps": 64,
            "hidden_sizes": [16],
            "normalize_obs": True,
            "normalize_reward": True,
            "eval_every": 512,
            "eval_episodes": 2,
            "checkpoint_every": 512,
        },
        2,
    ),
    "sac": (
        EnvSpec(id="Pendulum-v1"),
        {
            "total_timesteps": 1_200,
            "learning_starts": 300,
            "batch_size": 32,
            "hidden_sizes": [16],
            "log_every": 50,
            "eval_every": 400,
            "eval_episodes": 2,
            "checkpoint_every": 500,
            "checkpoint_buffer": True,
        },
        1,
    ),
    "ppo@pixels": (
        EnvSpec(id="MinAtar/Breakout-v1"),
        {
            "total_timesteps": 768,
            "num_envs": 2,
            "num_steps": 64,
            "eval_every": 256,
            "eval_episodes": 2,
            "checkpoint_every": 256,
        },
        2,
    ),
    # MuJoCo envs pickle as their constructor's arguments: the simulator's state is kept beside.
    "ppo@mujoco": (
        EnvSpec(id="InvertedPendulum-v5"),
        {
            "total_timesteps": 1_024,
            "num_envs": 2,
            "num_steps": 64,
            "hidden_sizes": [16],
            "normalize_obs": True,
            "eval_every": 256,
            "eval_episodes": 2,
            "checkpoint_every": 256,
        },
        2,
    ),
    "sac@mujoco": (
        EnvSpec(id="Hopper-v5"),
        {
            "total_timesteps": 600,
            "learning_starts": 100,
            "batch_size": 32,
            "hidden_sizes": [16],
            "log_every": 50,
            "eval_every": 200,
            "eval_episodes": 1,
            "checkpoint_every": 250,
            "checkpoint_buffer": True,
        },
        1,
    ),
    "rbm": (
        None,
        {
            "n_hidden": 16,
            "epochs": 4,
            "persistent": True,
            "figures": False,
            "probe": False,
            "checkpoint_every": 1,
        },
        2,
    ),
    "dbn": (
        None,
        {
            "layers": [16],
            "pretraining": {"epochs": 1},
            "finetune_epochs": 4,
            "finetune_batch_size": 128,
            "checkpoint_every": 1,
        },
        2,
    ),
    "autoencoder": (
        None,
        {
            "layers": [16],
            "variant": "denoising",
            "pretrain": True,
            "pretrain_epochs": 1,
            "epochs": 4,
            "figures": False,
            "probe": False,
            "checkpoint_every": 1,
        },
        2,  # the first is taken after pretraining
    ),
    "vae": (
        None,
        {
            "hidden": [32],
            "latent_dim": 4,
            "epochs": 4,
            "kl_warmup_epochs": 2,
            "iwae_k": 4,
            "iwae_examples": 50,
            "iwae_every": 1,
            "figures": False,
            "fid": {"enabled": False},
            "checkpoint_every": 1,
        },
        2,
    ),
    "gan": (
        None,
        {
            "loss": "wgan_gp",
            "n_critic": 3,
            "hidden": [32],
            "latent_dim": 8,
            "epochs": 4,
            "figures": False,
            "fid": {"enabled": False},
            "checkpoint_every": 1,
        },
        2,
    ),
}


class Died(Exception):
    """The worker 'dies' here."""


class DyingWriter(InMemoryWriter):
    """Raises once its `after`-th checkpoint has been written (the file is on disk by then)."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.checkpoints = after, 0

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        super().write_artifact(local_path, artifact_dir)
        if artifact_dir == "checkpoints":
            self.checkpoints += 1
            if self.checkpoints == self.after:
                raise Died(local_path.name)


def points(writer: InMemoryWriter) -> dict[str, list[tuple[int, float]]]:
    """Every metric but the clocks, which differ from run to run."""
    return {k: v for k, v in writer.metrics.items() if not k.startswith("time/")}


def assert_same(a: Any, b: Any, where: str) -> None:
    """Bitwise equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def context(
    algorithm: str, env: EnvSpec | None, workdir: Path, writer: InMemoryWriter
) -> RunContext:
    return RunContext(seed=3, writer=writer, workdir=workdir, env=env)


def test_every_algorithm_has_a_resume_case() -> None:
    assert set(ALGORITHMS) <= {case.split("@")[0] for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resumed_run_ends_as_the_uninterrupted_one(case: str, tmp_path: Path) -> None:
    env, params, crash_after = CASES[case]
    algo = ALGORITHMS[case.split("@")[0]]
    config = algo.config.model_validate(params)
    torch.set_num_threads(1)

    whole = RunContext(seed=3, writer=InMemoryWriter(), workdir=tmp_path / "whole", env=env)
    algo.train(config, whole)
    whole.close()

    dying = DyingWriter(crash_after)
    first = RunContext(seed=3, writer=dying, workdir=tmp_path / "resumed", env=env)
    with pytest.raises(Died) as died:
        algo.train(config, first)
    crashed_at = int(str(died.value).removeprefix("step_").removesuffix(".pt"))
    # What the service does for a restarted trial: the steps each metric has already.
    logged = {k: max(s for s, _ in v) for k, v in dying.metrics.items()}

    second = RunContext(seed=3, writer=InMemoryWriter(), workdir=tmp_path / "resumed", env=env)
    algo.train(config, second)
    second.close()
    replayed = {
        (k, s)
        for k, v in points(second.writer).items()
        for s, _ in v
        # Step 0 holds one-off results (`log_summary`), which every run logs at its end.
        if 0 < s <= crashed_at  # type: ignore[arg-type]
    }
    assert not replayed, f"the resumed run started over: {sorted(replayed)[:5]}"

    joined: dict[str, list[tuple[int, float]]] = {k: list(v) for k, v in points(dying).items()}
    for key, values in points(second.writer).items():  # type: ignore[arg-type]
        joined.setdefault(key, []).extend(p for p in values if p[0] > logged.get(key, -1))
    assert joined == points(whole.writer)  # type: ignore[arg-type]

    final_whole, final_resumed = whole.checkpoints.latest(), second.checkpoints.latest()
    assert final_whole is not None and final_resumed is not None
    for blob in ("envs", "env"):  # pickles of equal envs need not be equal bytes
        final_whole.pop(blob, None), final_resumed.pop(blob, None)
    assert_same(final_whole, final_resumed, "checkpoint")


def test_restarts_are_refused_where_a_resume_would_not_be_exact(tmp_path: Path) -> None:
    """DQN without its replay buffer in the checkpoint would refill it after a restart."""
    from service.spec import SpecError, load_spec

    from .conftest import ROOT

    spec = ROOT / "experiments" / "dqn_cartpole.yaml"
    with pytest.raises(SpecError) as e:
        load_spec(spec, ["max_failures=2", "params.checkpoint_buffer=false"])
    (problem,) = e.value.problems
    assert problem.field == "max_failures" and "checkpoint_buffer" in problem.message
    assert load_spec(spec, ["max_failures=2", "params.checkpoint_buffer=true"]).max_failures == 2
    # What each algorithm's checkpoint holds, and its budget, are stated in the registry.
    for algo in ALGORITHMS.values():
        assert algo.resumes and algo.budget
        assert all(b in algo.config.model_fields for b in algo.budget)


def test_an_env_that_does_not_pickle_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    """A run checkpoints many times; the reason its envs stay out of the checkpoints is said
    once, not at each of them."""
    import logging

    import gymnasium as gym

    from agents import envstate

    class Local(gym.Env):  # a local class does not pickle, as ALE's vector env does not
        pass

    with caplog.at_level(logging.WARNING, logger="agents.envstate"):
        assert all(envstate.snapshot(Local()) is None for _ in range(3))
    said = [r.getMessage() for r in caplog.records if "does not pickle" in r.getMessage()]
    assert len(said) == 1 and "a resumed run starts fresh episodes" in said[0]
