"""The closed table of algorithms. A spec names a key; nothing else can be imported through it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Literal

from pydantic import BaseModel

from agents import dp, dqn, policy_iteration, ppo, q_learning, sac, value_iteration
from generative import autoencoder, dbn, gan, rbm, vae
from runctx import RunContext


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: Literal["rl", "generative"]
    summary: str
    config: type[BaseModel]
    train: Callable[[Any, RunContext], None]
    # RL: (env, config) -> why the algorithm with that config cannot run on the env (its
    # spaces, no model, a network that cannot take its observations...), or None if it can.
    check_env: Callable[[Any, Any], str | None] | None = None
    # RL: (config, checkpoint, env) -> greedy policy, obs batch -> actions; for `rlgen evaluate`.
    load_policy: Callable[[Any, dict[str, Any], Any], Callable[[Any], Any]] | None = None
    needs_labels: bool = False  # needs a labelled data set
    # Generative: (config, dataset spec or None) -> why the model cannot fit that data, or None.
    check_data: Callable[[Any, Any], str | None] | None = None
    # The metric keys a run may log (fnmatch patterns: pretrain/layer*/...), for the spec's
    # `sweep.scheduler.metric` and `report`; besides them every run logs time/train_s.
    metrics: tuple[str, ...] = ()
    # What a checkpoint holds, so what a restart (`max_failures`), `rlgen continue` and PBT go
    # on from: every algorithm resumes exactly, on the cadence of its `checkpoint_every`.
    resumes: str = ""
    # Why this config would not resume exactly (a restart then changes the trajectory), or None;
    # a spec asking for restarts of such a config is refused.
    resume_problem: Callable[[Any], str | None] | None = None
    # The params `rlgen continue` may change: the training budget (steps, epochs, iterations).
    budget: tuple[str, ...] = ()

    def logs(self, key: str) -> bool:
        return any(fnmatch(key, m) for m in (*SERVICE_METRICS, *self.metrics))


# Logged by service.trial: for every run, its system metrics (`service.sysmetrics`), and for
# PBT members the values they train with.
SERVICE_METRICS = ("time/train_s", "system/*", "pbt/*")


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm(
            "value_iteration",
            "rl",
            "Value iteration with the Bellman optimality backup.",
            value_iteration.Config,
            value_iteration.train,
            metrics=value_iteration.METRICS,
            check_env=dp.check_env,
            load_policy=dp.load_policy,
            resumes="values and residuals, every checkpoint_every sweeps",
            budget=("max_iterations",),
        ),
        Algorithm(
            "policy_iteration",
            "rl",
            "Policy iteration, exact or iterative evaluation.",
            policy_iteration.Config,
            policy_iteration.train,
            metrics=policy_iteration.METRICS,
            check_env=dp.check_env,
            load_policy=dp.load_policy,
            resumes="values, policy and residuals, every checkpoint_every improvement steps",
            budget=("max_iterations",),
        ),
        Algorithm(
            "q_learning",
            "rl",
            "Tabular Q-learning, SARSA or Expected SARSA with decaying step size and epsilon.",
            q_learning.Config,
            q_learning.train,
            metrics=q_learning.METRICS,
            check_env=q_learning.check_env,
            load_policy=q_learning.load_policy,
            resumes="Q table, exploration stream, the env mid-episode; "
            "every checkpoint_every steps",
            budget=("total_timesteps",),
        ),
        Algorithm(
            "dqn",
            "rl",
            "DQN and Rainbow's parts (double, dueling, n-step, prioritized, C51, noisy); vector "
            "envs, Atari and MinAtar pixels.",
            dqn.Config,
            dqn.train,
            metrics=dqn.METRICS,
            check_env=dqn.check_env,
            load_policy=dqn.load_policy,
            resumes="networks, optimizer, random streams (noise included), n-step windows, the "
            "envs mid-episode (fresh episodes for ALE's, which do not pickle), and the replay "
            "buffer and frame store with checkpoint_buffer; every checkpoint_every steps",
            resume_problem=dqn.resume_problem,
            budget=("total_timesteps",),
        ),
        Algorithm(
            "ppo",
            "rl",
            "PPO with GAE, clipped surrogate and value loss; discrete or Gaussian policies.",
            ppo.Config,
            ppo.train,
            metrics=ppo.METRICS,
            check_env=ppo.check_env,
            load_policy=ppo.load_policy,
            resumes="actor-critic, optimizer, observation and return statistics, the sampling "
            "stream, the envs mid-episode; every checkpoint_every steps, between rollouts",
            budget=("total_timesteps",),
        ),
        Algorithm(
            "sac",
            "rl",
            "SAC with twin critics, a tanh-squashed Gaussian policy, automatic entropy tuning.",
            sac.Config,
            sac.train,
            metrics=sac.METRICS,
            check_env=sac.check_env,
            load_policy=sac.load_policy,
            resumes="actor, critics and targets, optimizers, temperature, random streams, the "
            "envs mid-episode, and the replay buffer with checkpoint_buffer; every "
            "checkpoint_every steps",
            resume_problem=sac.resume_problem,
            budget=("total_timesteps",),
        ),
        Algorithm(
            "rbm",
            "generative",
            "Restricted Boltzmann machine trained by CD-k or persistent CD.",
            rbm.Config,
            rbm.train,
            metrics=rbm.METRICS,
            check_data=rbm.check_data,
            resumes="weights, momentum, persistent chains, random streams; every epoch",
            budget=("epochs",),
        ),
        Algorithm(
            "dbn",
            "generative",
            "Deep belief net: greedy RBM pretraining, then supervised fine-tuning.",
            dbn.Config,
            dbn.train,
            metrics=dbn.METRICS,
            check_data=dbn.check_data,
            needs_labels=True,
            resumes="the pretrained network, then fine-tuning's optimizer, schedule and batch "
            "order; after pretraining and every fine-tuning epoch",
            budget=("finetune_epochs",),
        ),
        Algorithm(
            "autoencoder",
            "generative",
            "Deep autoencoder: plain, sparse, denoising or contractive.",
            autoencoder.Config,
            autoencoder.train,
            metrics=autoencoder.METRICS,
            check_data=autoencoder.check_data,
            resumes="weights, optimizer, random streams; after pretraining and every epoch",
            budget=("epochs",),
        ),
        Algorithm(
            "vae",
            "generative",
            "Variational autoencoder (MLP or conv), with the IWAE likelihood bound.",
            vae.Config,
            vae.train,
            metrics=vae.METRICS,
            check_data=vae.check_data,
            resumes="weights, optimizer, random streams; every epoch",
            budget=("epochs",),
        ),
        Algorithm(
            "gan",
            "generative",
            "GAN, MLP or DCGAN, non-saturating or WGAN-GP; classifier-feature FID.",
            gan.Config,
            gan.train,
            metrics=gan.METRICS,
            check_data=gan.check_data,
            resumes="both networks and optimizers, random streams, critic steps; every epoch",
            budget=("epochs",),
        ),
    ]
}
