"""SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications") for continuous
actions, with automatic entropy tuning.

Twin Q-networks and their Polyak-averaged targets; a tanh-squashed Gaussian policy:

    u ~ N(mu(s), sigma(s)),  a = tanh(u) * scale + center,
    log pi(a|s) = log N(u; mu, sigma) - sum_i log(scale_i (1 - tanh(u_i)^2))     (appendix C)

    y = r + gamma (1 - terminated) (min_j Q'_j(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
    L_Q = sum_j (Q_j(s, a) - y)^2,  L_pi = E[alpha log pi(a|s) - min_j Q_j(s, a)],  a ~ pi(.|s)
    L_alpha = -log alpha * E[log pi(a|s) + H_target],  H_target = -dim(A)         (eq. 18)

Defaults from CleanRL's `sac_continuous_action.py`: the actor and alpha are updated every
`policy_frequency` steps (that many times, TD3-style delayed), the critics every step. Replay is
DQN's buffer (`agents.replay`) holding action vectors.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from agents import envstate
from agents.evaluation import evaluate_and_log, length_metric
from agents.nets import default_init_, update_target
from agents.replay import NStep, ReplayBuffer
from runctx import RunContext
from runctx.accel import Compile, MixedPrecision, Precision, compile_modules
from runctx.checkpoints import capture

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the policy's log-std is squashed into this range


class Config(BaseModel):
    """Defaults: CleanRL's `sac_continuous_action.py` (the SAC paper's, with a 5k random start)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    total_timesteps: int = Field(1_000_000, gt=0, description="Transitions to collect.")
    buffer_size: int = Field(1_000_000, gt=0, description="Replay capacity in transitions.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    tau: float = Field(0.005, gt=0, le=1, description="Polyak step of the target critics.")
    batch_size: int = Field(256, gt=0, description="Transitions per gradient step.")
    learning_starts: int = Field(
        5_000, ge=0, description="Transitions collected (uniformly at random) before learning."
    )
    policy_lr: float = Field(3e-4, gt=0, description="Adam step size of the actor and alpha.")
    q_lr: float = Field(1e-3, gt=0, description="Adam step size of the critics.")
    policy_frequency: int = Field(
        2, gt=0, description="Steps between actor updates (each does this many)."
    )
    target_network_frequency: int = Field(1, gt=0, description="Steps between target updates.")
    alpha: float = Field(0.2, gt=0, description="Entropy temperature (initial, with autotune).")
    autotune: bool = Field(True, description="Tune alpha towards an entropy of -dim(A).")
    hidden_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [256, 256], description="Widths of the actor's and critics' MLPs."
    )
    num_envs: int = Field(1, ge=1, le=1024, description="Envs stepped as one batch.")
    eval_every: int = Field(10_000, gt=0, description="Timesteps between evaluations.")
    eval_episodes: int = Field(10, ge=1, le=1000, description="Deterministic eval episodes.")
    eval_max_steps: int = Field(
        10_000, gt=0, description="Cap on an evaluation episode in envs without a time limit."
    )
    stop_at_return: float | None = Field(
        None, description="Stop once an evaluation's mean return reaches this."
    )
    log_every: int = Field(100, gt=0, description="Gradient steps between loss metrics.")
    checkpoint_every: int = Field(
        50_000, gt=0, description="Timesteps between checkpoints (and at the end)."
    )
    checkpoint_buffer: bool = Field(
        False, description="Include the replay buffer in checkpoints (large, exact resume)."
    )
    precision: Precision = "fp32"
    compile: Compile = False


METRICS = (
    "charts/episodic_return",
    "charts/episodic_length",
    "losses/qf1_loss",
    "losses/qf2_loss",
    "losses/qf_values",
    "losses/actor_loss",
    "losses/alpha",
    "losses/alpha_loss",
    "losses/entropy",
    "eval/return_mean",
    "eval/return_std",
    "eval/length_mean",
    "time/sps",
    "time/train_s",
)


def check_env(env: gym.Env, config: Config | None = None) -> str | None:
    """Why SAC cannot run on `env` (whatever its `config`), or None."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        return f"SAC needs a one-dimensional Box of continuous actions, not {space}"
    if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        return "SAC squashes actions into their bounds, and this Box has infinite ones"
    obs = env.observation_space
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        return f"SAC takes vector observations (a one-dimensional Box), not {obs}"
    return None


def resume_problem(config: Config) -> str | None:
    if not config.checkpoint_buffer:
        return (
            "params.checkpoint_buffer is false: a restarted trial would refill its replay "
            "buffer from scratch; set it to true to allow restarts"
        )
    return None


def mlp(widths: list[int], generator: torch.Generator) -> nn.Sequential:
    """Linear layers with ReLUs between them, PyTorch's default init from `generator`."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    default_init_(net, generator)
    return net


class Actor(nn.Module):
    """obs (B, D) -> a tanh-squashed Gaussian over actions (B, A) in [low, high]."""

    def __init__(
        self, obs_dim: int, space: gym.spaces.Box, hidden: list[int], generator: torch.Generator
    ):
        super().__init__()
        n = int(space.shape[0])
        self.net = mlp([obs_dim, *hidden, 2 * n], generator)
        self.register_buffer("scale", torch.as_tensor((space.high - space.low) / 2.0).float())
        self.register_buffer("center", torch.as_tensor((space.high + space.low) / 2.0).float())

    scale: torch.Tensor
    center: torch.Tensor

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and log-stds of the pre-squash Gaussian, each (B, A), in float32 (under mixed
        precision, the squashed log-probability is computed in full precision)."""
        mean, log_std = self.net(obs).float().chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(
        self, obs: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions (B, A) and their log-probabilities (B,), with the tanh correction."""
        mean, log_std = self(obs)
        u = mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.squash(u), squashed_log_prob(u, mean, log_std, self.scale)

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(u) * self.scale + self.center

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.squash(self(obs)[0])


def squashed_log_prob(
    u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """log pi(a) for a = tanh(u) scale + center, u ~ N(mean, exp(log_std)): the Gaussian's log
    density minus log |da/du| = sum_i log(scale_i (1 - tanh(u_i)^2)), in the stable form
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)). (B, A) -> (B,)."""
    gaussian = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = torch.log(scale) + 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (gaussian - log_det).sum(-1)


class QNetwork(nn.Module):
    """(obs (B, D), action (B, A)) -> Q (B,)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: list[int], g: torch.Generator):
        super().__init__()
        self.net = mlp([obs_dim + n_actions, *hidden, 1], g)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).float().squeeze(-1)


def train(config: Config, ctx: RunContext) -> None:
    device = ctx.device
    envs = ctx.make_vec_env(config.num_envs)
    eval_envs = ctx.make_vec_env(config.eval_episodes, evaluation=True)
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.NEXT_STEP:
        raise ValueError(f"unsupported vector-env autoreset mode {mode}")
    n_envs = config.num_envs
    space = envs.single_action_space
    assert isinstance(space, gym.spaces.Box)
    obs_dim, n_actions = int(np.prod(envs.single_observation_space.shape or ())), space.shape[0]
    envs.action_space.seed(int(ctx.rng("exploration").integers(2**31)))
    init = ctx.torch_generator("init", "cpu")
    actor = Actor(obs_dim, space, config.hidden_sizes, init).to(device)
    qf1 = QNetwork(obs_dim, n_actions, config.hidden_sizes, init).to(device)
    qf2 = QNetwork(obs_dim, n_actions, config.hidden_sizes, init).to(device)
    qf1_target, qf2_target = copy.deepcopy(qf1), copy.deepcopy(qf2)
    critics = nn.ModuleList([qf1, qf2])
    q_optimizer = torch.optim.Adam(critics.parameters(), lr=config.q_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=config.policy_lr, fused=True)
    log_alpha = torch.full((1,), math.log(config.alpha), device=device, requires_grad=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=config.policy_lr, fused=True)
    target_entropy = -float(n_actions)
    amp = MixedPrecision(config.precision, device)
    nets = (actor.net, qf1.net, qf2.net, qf1_target.net, qf2_target.net)
    compile_modules(config.compile, *nets, device=device)
    sampling = ctx.torch_generator("policy", device=device)  # actions drawn from the policy
    buffer = ReplayBuffer(
        config.buffer_size,
        (obs_dim,),
        torch.float32,
        device,
        ctx.torch_generator("replay", device=device),
        action_shape=(n_actions,),
        action_dtype=torch.float32,
    )
    one_step = NStep(1, n_envs, config.gamma)  # (s, a, r, s', gamma (1 - terminated))

    state: dict[str, Any] = {
        "actor": actor,
        "qf1": qf1,
        "qf2": qf2,
        "qf1_target": qf1_target,
        "qf2_target": qf2_target,
        "q_optimizer": q_optimizer,
        "actor_optimizer": actor_optimizer,
        "log_alpha": log_alpha,
        "alpha_optimizer": alpha_optimizer,
        "sampling": sampling,
        "replay_rng": buffer.generator,
        "action_rng": envs.action_space.np_random,
        **amp.state(),
        **({"buffer": buffer} if config.checkpoint_buffer else {}),
    }
    step, updates = 0, 0
    next_eval, next_ckpt = config.eval_every, config.checkpoint_every
    # Losses summed since the last loss metric (in checkpoints: a resumed run logs the same).
    sums = {k: torch.zeros((), device=device) for k in ("qf1", "qf2", "qv", "actor", "ent")}
    alpha_loss = torch.zeros((), device=device)
    evals: list[tuple[int, float]] = []
    obs, _ = envs.reset(seed=ctx.seed)
    valid = np.ones(n_envs, dtype=bool)
    ep_return, ep_length = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
    if (saved := ctx.checkpoints.restore(state)) is not None:
        step, updates = saved["step"], saved["updates"]
        next_eval, next_ckpt = saved["next_eval"], saved["next_ckpt"]
        evals = [(int(s), m) for s, m in saved["evals"].tolist()]
        for k, v in sums.items():
            v.copy_(saved["sums"][k])
        alpha_loss.copy_(saved["alpha_loss"])
        if "envs" in saved:
            envs.close()
            envs = envstate.revive(saved["envs"])
            state["action_rng"] = envs.action_space.np_random
            obs, valid = saved["obs"].numpy(), saved["valid"].numpy()
            ep_return, ep_length = saved["ep_return"].numpy(), saved["ep_length"].numpy()
        else:
            obs, _ = envs.reset(seed=ctx.seed + step)
        ctx.log.info("resumed from the checkpoint at timestep %d", step)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(len(x), -1), device=device)

    @torch.inference_mode()
    def act_deterministic(o: np.ndarray) -> np.ndarray:
        return actor.deterministic(tensor(o)).cpu().numpy()

    def evaluate() -> float:
        mean, _ = evaluate_and_log(
            ctx, eval_envs, act_deterministic, config.eval_episodes, config.eval_max_steps, step
        )
        evals.append((step, mean))
        return mean

    def checkpoint() -> None:
        with ctx.timer.paused():
            ctx.checkpoints.save(
                {
                    **capture(state),
                    "step": step,
                    "updates": updates,
                    "next_eval": next_eval,
                    "next_ckpt": next_ckpt,
                    "evals": torch.tensor(evals, dtype=torch.float64).reshape(-1, 2),
                    "sums": {k: v.cpu() for k, v in sums.items()},
                    "alpha_loss": alpha_loss.detach().cpu(),
                    **envstate.episodes_state(
                        envs, obs=obs, valid=valid, ep_return=ep_return, ep_length=ep_length
                    ),
                },
                step=step,
            )

    tick = (step, ctx.timer.elapsed())
    while step < config.total_timesteps and not ctx.should_stop():
        # -- act: uniformly at random first, then from the policy -----------------------------
        if step < config.learning_starts:
            actions = envs.action_space.sample()
        else:
            with torch.no_grad():
                actions = actor.sample(tensor(obs), sampling)[0].cpu().numpy()
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        done = terminated | truncated
        # Truncation bootstraps (discount gamma), termination does not; next-step autoreset
        # returns the final observation now and resets on the next step.
        buffer.add(one_step.push(obs, actions, rewards, next_obs, terminated, done, valid))
        step += int(valid.sum())
        ep_return += rewards * valid
        ep_length += valid
        for e in np.flatnonzero(done & valid):
            ctx.log_metrics(
                {
                    "charts/episodic_return": ep_return[e],
                    **length_metric("charts/episodic_length", ep_return[e], ep_length[e]),
                },
                step=step,
            )
        ep_return[done], ep_length[done] = 0.0, 0
        valid = ~done
        obs = next_obs

        # -- learn ----------------------------------------------------------------------------
        if step > config.learning_starts and buffer.size >= config.batch_size:
            batch = buffer.sample(config.batch_size)
            alpha = log_alpha.detach().exp()
            with amp.autocast():
                with torch.no_grad():
                    next_a, next_logp = actor.sample(batch.next_obs, sampling)
                    next_q = torch.min(
                        qf1_target(batch.next_obs, next_a), qf2_target(batch.next_obs, next_a)
                    )
                    y = batch.returns + batch.discounts * (next_q - alpha * next_logp)
                q1, q2 = qf1(batch.obs, batch.actions), qf2(batch.obs, batch.actions)
                qf1_loss, qf2_loss = F.mse_loss(q1, y), F.mse_loss(q2, y)
            amp.step(qf1_loss + qf2_loss, q_optimizer)
            sums["qf1"] += qf1_loss.detach()
            sums["qf2"] += qf2_loss.detach()
            sums["qv"] += q1.detach().mean()
            if updates % config.policy_frequency == 0:  # delayed, as many times as skipped
                # The actor's loss flows through the critics to the actions only: with their
                # weights frozen, backward skips the critics' weight gradients (~1/9 of an update).
                critics.requires_grad_(False)
                for _ in range(config.policy_frequency):
                    with amp.autocast():
                        a, logp = actor.sample(batch.obs, sampling)
                        q = torch.min(qf1(batch.obs, a), qf2(batch.obs, a))
                        actor_loss = (log_alpha.detach().exp() * logp - q).mean()
                    amp.step(actor_loss, actor_optimizer)
                    if config.autotune:
                        loss = -(log_alpha * (logp.detach() + target_entropy)).mean()
                        alpha_optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        alpha_optimizer.step()
                        alpha_loss.copy_(loss.detach())
                critics.requires_grad_(True)
                sums["actor"] += actor_loss.detach()
                sums["ent"] += -logp.detach().mean()
            if updates % config.target_network_frequency == 0:
                update_target(qf1_target, qf1, config.tau)
                update_target(qf2_target, qf2, config.tau)
            updates += 1
            if updates % config.log_every == 0:
                now = (step, ctx.timer.elapsed())
                sps = (now[0] - tick[0]) / max(now[1] - tick[1], 1e-9)
                tick = now
                n_pi = max(1, config.log_every // config.policy_frequency)
                ctx.log_metrics(
                    {
                        "losses/qf1_loss": sums["qf1"] / config.log_every,
                        "losses/qf2_loss": sums["qf2"] / config.log_every,
                        "losses/qf_values": sums["qv"] / config.log_every,
                        "losses/actor_loss": sums["actor"] / n_pi,
                        "losses/entropy": sums["ent"] / n_pi,
                        "losses/alpha": log_alpha.detach().exp(),
                        **({"losses/alpha_loss": alpha_loss.detach()} if config.autotune else {}),
                        "time/sps": sps,
                    },
                    step=step,
                )
                for v in sums.values():
                    v.zero_()
                if not math.isfinite(float(qf1_loss.detach())):
                    raise FloatingPointError(f"SAC critic loss is not finite at timestep {step}")

        # -- evaluate and checkpoint ----------------------------------------------------------
        if step >= next_eval:
            next_eval += config.eval_every
            mean = evaluate()
            if config.stop_at_return is not None and mean >= config.stop_at_return:
                break
        if step >= next_ckpt:
            next_ckpt += config.checkpoint_every
            checkpoint()

    ctx.timer.stop()
    if not evals or evals[-1][0] != step:
        evaluate()
    checkpoint()
    envs.close()
    eval_envs.close()


def load_policy(config: Config, state: dict[str, Any], env: gym.Env) -> Any:
    """The deterministic policy of a checkpoint, for `rlgen evaluate`: obs (N, D) -> actions."""
    space = env.action_space
    assert isinstance(space, gym.spaces.Box)
    obs_dim = int(np.prod(env.observation_space.shape or ()))
    actor = Actor(obs_dim, space, config.hidden_sizes, torch.Generator())
    actor.load_state_dict(state["actor"])

    @torch.inference_mode()
    def act(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(len(obs), -1))
        return actor.deterministic(x).numpy()

    return act


__all__ = ["Config", "check_env", "load_policy", "squashed_log_prob", "train"]
