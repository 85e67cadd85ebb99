"""Tiny budgets for the example specs: what the tests and the GPU check run each example with.
The overrides shrink the budget; each example's own structure (networks, envs, options) stays."""

from __future__ import annotations

from pathlib import Path

import torch

from service.spec import load_spec

# Per algorithm, overrides that shrink the budget; the example's own structure stays as it is.
TINY: dict[str, list[str]] = {
    "value_iteration": ["params.eval_episodes=3", "params.max_iterations=200"],
    "q_learning": [
        "params.total_timesteps=2000",
        "params.eval_every=1000",
        "params.eval_episodes=5",
    ],
    "dqn": [
        "params.total_timesteps=600",
        "params.learning_starts=100",
        "params.train_freq=100",
        "params.gradient_steps=5",
        "params.eval_every=300",
        "params.eval_episodes=2",
        "params.eval_max_steps=200",  # an untrained Pong player's game lasts thousands of steps
        "params.buffer_size=1000",
    ],
    "policy_iteration": ["params.eval_episodes=3", "params.max_iterations=20"],
    "sac": [
        "params.total_timesteps=400",
        "params.learning_starts=200",
        "params.eval_every=200",
        "params.eval_episodes=2",
        "params.buffer_size=1000",
    ],
    "ppo": [
        "params.total_timesteps=512",
        "params.num_steps=64",
        "params.eval_every=256",
        "params.eval_episodes=2",
        "params.eval_max_steps=200",
    ],
    "dbn": ["params.pretraining.epochs=1", "params.finetune_epochs=1", "dataset.limit=300"],
    "autoencoder": ["params.pretrain_epochs=1", "params.epochs=1", "dataset.limit=300"],
    "vae": ["params.epochs=1", "params.iwae_k=2", "params.iwae_examples=20", "dataset.limit=300"],
    "gan": ["params.epochs=1", "dataset.limit=300"],
    "rbm": [
        "params.epochs=1",
        "params.ais.temperatures=100",
        "params.ais.runs=5",
        "params.sample_steps=5",
        "dataset.limit=300",
    ],
}


def tiny_overrides(path: Path, algorithm: str) -> list[str]:
    extra = ["env.kwargs.size=20"] if "gridworld" in path.name else []
    if load_spec(path).resources.num_gpus and not torch.cuda.is_available():
        extra += ["resources.num_gpus=0", "resources.device=cpu"]  # a GPU example, run here
    return [*TINY[algorithm], *extra, "seeds=[0]"]
