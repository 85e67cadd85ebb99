"""PPO (Schulman et al. 2017) on gymnasium vector envs, discrete and continuous actions.

Each update collects `num_steps` steps from each of `num_envs` envs, computes GAE(lambda)
advantages (Schulman et al. 2016),

    delta_t = r_t + gamma V(s_{t+1}) (1 - done_t) - V(s_t)
    A_t = delta_t + gamma lambda (1 - done_t) A_{t+1},

and takes `update_epochs` passes of minibatch gradient steps on

    L = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)] + c_v L_V - c_e H[pi]
    rho = pi(a|s) / pi_old(a|s).

Implementation details, after Huang et al., "The 37 Implementation Details of PPO" (ICLR blog
track 2022). In: vector envs (1); orthogonal initialisation, sqrt(2) hidden, 0.01 policy and 1
value output gains (2); Adam eps 1e-5 (3); learning rate annealed linearly to 0 (4); GAE (5);
minibatches of shuffled indices (6); advantage normalisation per minibatch (7); clipped
surrogate (8); clipped value loss (9); entropy bonus (10); global gradient-norm clipping (11);
approx KL (the unbiased estimator (rho - 1) - log rho) and clip fraction as metrics (12);
separate actor and critic MLPs with tanh (13); truncated episodes bootstrap from V(final obs)
(in place of the blog's "done" handling; gymnasium reports truncation apart); continuous
actions: a diagonal Gaussian with a state-independent log-std (detail c1), sampled actions
clipped to the bounds for the env while their log-probabilities use the unclipped sample (c2),
observation and reward normalisation by running statistics with clipping to +-10 (c3-c6,
`normalize_obs`, `normalize_reward`). Atari (CleanRL's `ppo_atari.py`): the preprocessing
(details 19-25: no-op reset, frame skip with max-pooling, life loss as an episode's end where
`terminal_on_life_loss` asks, FIRE on reset, reward clipping, 84x84 greyscale, 4 stacked frames)
comes from the env's `preprocessing` (ALE's vector env); a shared Nature CNN torso with a
512-unit layer and linear actor and critic heads, orthogonally initialised (26-27), bytes
scaled by 1/255 inside the network (28). MinAtar's grids get MinAtar's small CNN the same way.
Not in: early stopping on a target KL (off by default in the reference too), LSTM and
multi-discrete details.

Speed: acting for MLP policies on the CPU runs in NumPy on the parameters' own memory
(`NumpyActorCritic`), the same network without torch's per-operator cost on batches of a few
observations; the rollout is stored in NumPy and moved to the device once per update.

Counting: a *timestep* is one transition of one env (the reset step of gymnasium's next-step
autoreset is not one, and is left out of the loss).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from agents import envstate
from agents.evaluation import evaluate_and_log, length_metric
from agents.nets import image_torso, network_problem
from runctx import RunContext
from runctx.accel import Compile, MixedPrecision, Precision, compile_modules
from runctx.checkpoints import capture


class Config(BaseModel):
    """Defaults: CleanRL's `ppo.py` / `ppo_continuous_action.py` (Huang et al. 2022)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    total_timesteps: int = Field(500_000, gt=0, description="Transitions to collect.")
    learning_rate: float = Field(2.5e-4, gt=0, description="Adam step size at the start.")
    anneal_lr: bool = Field(True, description="Anneal the step size linearly to 0.")
    num_envs: int = Field(4, ge=1, le=1024, description="Envs stepped as one batch.")
    num_steps: int = Field(128, gt=0, description="Steps per env in each rollout.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE's lambda.")
    num_minibatches: int = Field(4, gt=0, description="Minibatches per epoch.")
    update_epochs: int = Field(4, gt=0, description="Passes over each rollout.")
    norm_adv: bool = Field(True, description="Normalise advantages per minibatch.")
    clip_coef: float = Field(0.2, gt=0, description="Surrogate clipping epsilon.")
    anneal_clip: bool = Field(
        False,
        description="Anneal the clipping epsilon linearly to 0 over the budget, as the step "
        "size (SB3's linear schedules, which RL-Zoo3 uses on classic control).",
    )
    clip_vloss: bool = Field(True, description="Clip the value loss as the surrogate is.")
    ent_coef: float = Field(0.01, ge=0, description="Entropy bonus coefficient.")
    vf_coef: float = Field(0.5, ge=0, description="Value loss coefficient.")
    max_grad_norm: float = Field(0.5, gt=0, description="Clip the gradient's global norm.")
    network: Literal["auto", "mlp", "nature_cnn", "minatar_cnn"] = Field(
        "auto",
        description="auto: a shared Nature CNN torso for images of 36+ pixels a side, "
        "MinAtar's CNN for smaller grids, separate actor and critic MLPs for vectors.",
    )
    hidden_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [64, 64], description="Widths of the actor's and critic's MLPs."
    )
    normalize_obs: bool = Field(
        False, description="Normalise observations by running mean and std (MuJoCo: on)."
    )
    normalize_reward: bool = Field(
        False,
        description="Scale rewards by the running std of the discounted return (MuJoCo: on).",
    )
    eval_every: int = Field(10_000, gt=0, description="Timesteps between evaluations.")
    eval_episodes: int = Field(10, ge=1, le=1000, description="Deterministic eval episodes.")
    eval_max_steps: int = Field(
        10_000, gt=0, description="Cap on an evaluation episode in envs without a time limit."
    )
    stop_at_return: float | None = Field(
        None, description="Stop once an evaluation's mean return reaches this."
    )
    checkpoint_every: int = Field(
        50_000, gt=0, description="Timesteps between checkpoints (and at the end)."
    )
    precision: Precision = "fp32"
    compile: Compile = False


METRICS = (
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/learning_rate",
    "charts/clip_coef",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "eval/return_mean",
    "eval/return_std",
    "eval/length_mean",
    "time/sps",
    "time/train_s",
)


def check_env(env: gym.Env, config: Config | None = None) -> str | None:
    """Why PPO with `config` (None: the defaults) cannot run on `env`, or None."""
    if not isinstance(env.action_space, gym.spaces.Discrete | gym.spaces.Box):
        return f"PPO needs a Discrete or Box action space, not {env.action_space}"
    if isinstance(env.action_space, gym.spaces.Box) and len(env.action_space.shape) != 1:
        return f"PPO needs a one-dimensional Box of actions, not {env.action_space}"
    space = env.observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) not in (1, 3):
        return (
            "PPO takes vector observations (a one-dimensional Box) or images (a 3-dimensional "
            f"Box), not {space}"
        )
    return network_problem(config.network if config is not None else "auto", space)


class RunningMeanStd(nn.Module):
    """Running mean and variance of batches (Chan et al.'s parallel update); buffers, so
    checkpoints and `rlgen evaluate` carry them."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def update(self, x: np.ndarray) -> None:
        # In NumPy on the buffers' memory (`.numpy()` shares it): a step's batch is a few
        # numbers, for which torch's per-op overhead would cost more than the env step.
        batch = np.asarray(x, dtype=np.float64)
        if len(batch) == 0:  # every env was on its reset step
            return
        mean, var, count = self.mean.numpy(), self.var.numpy(), self.count.numpy()
        n = len(batch)
        b_mean, b_var = (batch[0], 0.0) if n == 1 else (batch.mean(0), batch.var(0))
        delta, total = b_mean - mean, count + n
        var[...] = (var * count + b_var * n + delta**2 * count * n / total) / total
        mean += delta * n / total
        count[...] = total

    def normalize(self, x: np.ndarray, clip: float = 10.0) -> np.ndarray:
        z = (x - self.mean.numpy()) / np.sqrt(self.var.numpy() + 1e-8)
        return np.clip(z, -clip, clip).astype(np.float32)


def layer(p: int, q: int, gain: float, generator: torch.Generator) -> nn.Linear:
    """A linear layer with orthogonal weights of `gain` and zero biases (detail 2)."""
    m = nn.Linear(p, q)
    nn.init.orthogonal_(m.weight, gain, generator=generator)
    nn.init.zeros_(m.bias)
    return m


def mlp(widths: list[int], out: int, out_gain: float, generator: torch.Generator) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [layer(a, b, math.sqrt(2), generator), nn.Tanh()]
    return nn.Sequential(*layers, layer(widths[-1], out, out_gain, generator))


HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ActorCritic(nn.Module):
    """obs -> policy (logits (B, A), or Gaussian means (B, A) with a state-independent log-std
    (A,)) and value (B,). Vector observations (B, D): separate actor and critic MLPs (tanh).
    Images (B, C, H, W) or (B, H, W, C): a shared CNN torso and a 512-unit ReLU layer, then a
    linear actor head and a linear critic head (CleanRL's `ppo_atari.py`)."""

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        hidden: list[int],
        generator: torch.Generator,
        network: str = "auto",
    ):
        super().__init__()
        self.continuous = isinstance(action_space, gym.spaces.Box)
        size = np.prod(action_space.shape or ()) if self.continuous else action_space.n  # type: ignore[attr-defined]
        n = int(size)
        cnn = image_torso(network, obs_space)
        if cnn is None:
            widths = [int(np.prod(obs_space.shape)), *hidden]  # type: ignore[arg-type]
            self.torso: nn.Module = nn.Identity()
            self.critic = mlp(widths, 1, 1.0, generator)
            self.actor = mlp(widths, n, 0.01, generator)
        else:
            for m in cnn.modules():
                if isinstance(m, nn.Conv2d):  # detail 26: orthogonal, sqrt(2), zero biases
                    nn.init.orthogonal_(m.weight, math.sqrt(2), generator=generator)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            self.torso = nn.Sequential(
                cnn, layer(cnn.out_dim, 512, math.sqrt(2), generator), nn.ReLU()
            )
            self.critic = layer(512, 1, 1.0, generator)
            self.actor = layer(512, n, 0.01, generator)
        self.log_std = nn.Parameter(torch.zeros(n)) if self.continuous else None
        self.out_dim = n  # the policy's output per observation: logits or Gaussian means

    # The networks' outputs in float32: under mixed precision, log-probabilities, their ratios
    # and the value loss are computed in full precision.
    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's output (see `policy`) and the value, (B,), from one torso pass."""
        h = self.torso(obs)
        return self.actor(h).float(), self.critic(h).float().squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.torso(obs)).float().squeeze(-1)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (B, A), or the Gaussian's means (B, A)."""
        return self.actor(self.torso(obs)).float()

    # The policy's maths written out (torch.distributions objects cost more to build, with
    # their argument checks, than the tiny networks of classic control cost to run).
    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s), (B,): log N(a; mean, std) summed over the action's dimensions, or the
        log-softmax at a."""
        if self.log_std is not None:
            z = (actions - out) / self.log_std.exp()
            return (-0.5 * z**2 - self.log_std - HALF_LOG_2PI).sum(-1)
        return out.log_softmax(-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        """H[pi(.|s)], (B,): sum_i (1/2 + log(2 pi)/2 + log std_i), or -sum_a p log p."""
        if self.log_std is not None:
            return (0.5 + HALF_LOG_2PI + self.log_std).sum().expand(len(out))
        logp = out.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mode: argmax of the logits, or the Gaussian's mean."""
        out = self.policy(obs)
        return out if self.continuous else out.argmax(-1)


def draw_actions(
    out: np.ndarray, log_std: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Actions for the policy's outputs `out` (B, A): mean + std * N(0, 1) for a Gaussian with
    `log_std` (A,), or, for logits, the categorical's inverse CDF at U(0, 1) (indices, (B,))."""
    if log_std is not None:
        return out + np.exp(log_std) * rng.standard_normal(out.shape, dtype=np.float32)
    probs = np.exp(out - out.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    u = rng.random((len(out), 1), dtype=np.float32)
    return np.minimum((cdf < u).sum(-1), out.shape[-1] - 1)


class NumpyActorCritic:
    """`ActorCritic`'s forward pass in NumPy, for acting with MLPs on the CPU in float32.

    Acting for a few envs multiplies tiny matrices: torch's per-operator dispatch (~20
    operators a step, microseconds each) costs more than the arithmetic, and more than a MuJoCo
    step; NumPy's per-call cost is a fraction of it. The weights are the parameters' own memory
    (`.numpy()` views), so the optimizer's in-place steps and checkpoint loads show through: it
    is the same network, not a copy (the tests compare it with the torch forward pass)."""

    def __init__(self, agent: ActorCritic):
        self.actor, self.critic = self._layers(agent.actor), self._layers(agent.critic)

    @staticmethod
    def applies(agent: ActorCritic, device: torch.device, precision: str, compiled: bool) -> bool:
        return (
            device.type == "cpu"
            and precision == "fp32"
            and not compiled
            and isinstance(agent.torso, nn.Identity)
        )

    @staticmethod
    def _layers(seq: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W^T (in, out), b (out,)) views of an `mlp`: Linear layers with tanh between them."""
        assert all(isinstance(m, nn.Linear | nn.Tanh) for m in seq.children()), seq
        linears = [m for m in seq.children() if isinstance(m, nn.Linear)]
        return [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in linears]

    @staticmethod
    def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            if i < len(layers) - 1:
                np.tanh(x, out=x)
        return x

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """obs (B, D) float32 -> the policy's output (B, A) and the values (B,)."""
        return self._mlp(self.actor, obs), self._mlp(self.critic, obs)[:, 0]


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_values: np.ndarray,
    gamma: float,
    lam: float,
) -> np.ndarray:
    """GAE(lambda) advantages, (T, N), of rewards, values and dones (T, N) with V(s_T) (N,).

    done_t: the episode ended at step t (terminated or truncated); a truncated step's reward
    already holds gamma V(final obs), so nothing is bootstrapped across an episode's end."""
    advantages = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1])
    for t in reversed(range(len(rewards))):
        next_values = last_values if t == len(rewards) - 1 else values[t + 1]
        alive = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
    return advantages


def clipped_surrogate(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, eps: float
) -> torch.Tensor:
    """-E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = exp(new - old): its gradient is 0 for
    samples whose ratio has left the clip range in the direction their advantage favours."""
    ratio = (new_log_prob - old_log_prob).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages).mean()


def train(config: Config, ctx: RunContext) -> None:
    device = ctx.device
    envs = ctx.make_vec_env(config.num_envs)
    eval_envs = ctx.make_vec_env(config.eval_episodes, evaluation=True)
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.NEXT_STEP:
        raise ValueError(f"unsupported vector-env autoreset mode {mode}")
    n_envs, n_steps = config.num_envs, config.num_steps
    obs_space, action_space = envs.single_observation_space, envs.single_action_space
    obs_dim = int(np.prod(obs_space.shape))  # type: ignore[arg-type]
    envs.action_space.seed(int(ctx.rng("exploration").integers(2**31)))
    agent = ActorCritic(
        obs_space,
        action_space,
        config.hidden_sizes,
        ctx.torch_generator("init", "cpu"),
        config.network,
    )
    agent.to(device)
    # Images enter the CNN as the env's bytes (scaled inside it): no flattening, no running
    # normalisation, and a quarter of float32's bytes in the rollout storage.
    images = not isinstance(agent.torso, nn.Identity)
    if images and config.normalize_obs:
        raise ValueError("normalize_obs is for vector observations; the CNN scales images")
    obs_shape = tuple(obs_space.shape) if images else (obs_dim,)  # type: ignore[arg-type]
    params = list(agent.parameters())  # a list: clipping walks it every step
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, eps=1e-5, fused=True)
    amp = MixedPrecision(config.precision, device)
    compiled = compile_modules(config.compile, agent, device=device)
    obs_stats = RunningMeanStd((obs_dim,))
    ret_stats = RunningMeanStd(())
    sampling = ctx.torch_generator("policy", device=device)  # minibatch shuffles
    noise = ctx.rng("actions")
    low = high = None
    if agent.continuous:
        low, high = action_space.low, action_space.high  # type: ignore[attr-defined]

    state: dict[str, Any] = {
        "agent": agent,
        "optimizer": optimizer,
        "obs_stats": obs_stats,
        "ret_stats": ret_stats,
        "sampling": sampling,
        "noise": noise,
        **amp.state(),
    }
    step, updates = 0, 0
    next_eval, next_ckpt = config.eval_every, config.checkpoint_every
    evals: list[tuple[int, float]] = []
    raw_obs, _ = envs.reset(seed=ctx.seed)
    valid = np.ones(n_envs, dtype=bool)
    ep_return, ep_length = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
    discounted = np.zeros(n_envs)  # the running discounted return, for reward normalisation
    if (saved := ctx.checkpoints.restore(state)) is not None:
        step, updates = saved["step"], saved["updates"]
        next_eval, next_ckpt = saved["next_eval"], saved["next_ckpt"]
        evals = [(int(s), m) for s, m in saved["evals"].tolist()]
        if "envs" in saved:
            envs.close()
            envs = envstate.revive(saved["envs"])
            raw_obs, valid = saved["obs"].numpy(), saved["valid"].numpy()
            ep_return, ep_length = saved["ep_return"].numpy(), saved["ep_length"].numpy()
            discounted = saved["discounted"].numpy()
        else:
            raw_obs, _ = envs.reset(seed=ctx.seed + step)
        ctx.log.info("resumed from the checkpoint at timestep %d", step)

    def observe(raw: np.ndarray, update: bool) -> np.ndarray:
        """The network's input: images as the env's bytes, vectors flattened to float32 and
        normalised where asked (updating the running statistics with rollout observations)."""
        if images:
            return np.asarray(raw)
        x = np.asarray(raw, dtype=np.float32).reshape(len(raw), -1)
        if config.normalize_obs:
            if update:
                obs_stats.update(x)
            x = obs_stats.normalize(x)
        return x

    @torch.inference_mode()
    def values(raw: np.ndarray) -> np.ndarray:
        return agent.value(torch.as_tensor(observe(raw, update=False), device=device)).cpu().numpy()

    @torch.inference_mode()
    def act_deterministic(raw: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(observe(raw, update=False), device=device)
        out = agent.deterministic(x).cpu().numpy()
        return np.clip(out, low, high) if agent.continuous else out

    # Acting: the policy's outputs and values in NumPy where that is the same network (see
    # `NumpyActorCritic`), else in torch; actions drawn from the trial's "actions" stream.
    numpy_net = None
    if NumpyActorCritic.applies(agent, device, config.precision, compiled):
        numpy_net = NumpyActorCritic(agent)

    def act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if numpy_net is not None:
            out, value = numpy_net(x)
        else:
            with torch.inference_mode(), amp.autocast():
                out_t, value_t = agent(torch.as_tensor(x, device=device))
            out, value = out_t.cpu().numpy(), value_t.cpu().numpy()
        log_std = None if agent.log_std is None else agent.log_std.detach().cpu().numpy()
        return out, value, draw_actions(out, log_std, noise)

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
                    **envstate.episodes_state(
                        envs,
                        obs=raw_obs,
                        valid=valid,
                        ep_return=ep_return,
                        ep_length=ep_length,
                        discounted=discounted,
                    ),
                },
                step=step,
            )

    # Rollout storage, (T, N, ...), in NumPy (the learning phase moves the valid steps to the
    # device in one copy each).
    shape_a: tuple[int, ...] = tuple(action_space.shape or ()) if agent.continuous else ()
    obs_dtype = np.uint8 if images and obs_space.dtype == np.uint8 else np.float32
    b_obs = np.zeros((n_steps, n_envs, *obs_shape), dtype=obs_dtype)
    b_actions = np.zeros((n_steps, n_envs, *shape_a), dtype=np.float32)
    b_out = np.zeros((n_steps, n_envs, agent.out_dim), dtype=np.float32)  # logits or means
    b_values = np.zeros((n_steps, n_envs), dtype=np.float32)
    b_rewards = np.zeros((n_steps, n_envs), dtype=np.float32)
    b_dones = np.zeros((n_steps, n_envs), dtype=np.float32)
    b_valid = np.zeros((n_steps, n_envs), dtype=bool)
    tick = (step, ctx.timer.elapsed())
    while step < config.total_timesteps and not ctx.should_stop():
        # Detail 4: the step size annealed linearly to 0 over the budget (in timesteps: reset
        # steps are not transitions, so the number of rollouts is not known in advance).
        frac = max(0.0, 1 - step / config.total_timesteps)
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = config.learning_rate * frac
        clip = config.clip_coef * frac if config.anneal_clip else config.clip_coef
        # -- collect ------------------------------------------------------------------------
        for t in range(n_steps):
            obs = observe(raw_obs, update=True)
            # The actions' log-probabilities are computed for the whole rollout at once, after
            # it, from the stored policy outputs.
            out, value, action = act(obs)
            env_action = action
            if agent.continuous:  # detail c2: the env gets the clipped action
                env_action = np.clip(action, low, high)
            raw_next, reward, terminated, truncated, _ = envs.step(env_action)
            done = terminated | truncated
            reward = np.asarray(reward, dtype=np.float64)
            step += int(valid.sum())
            ep_return += reward * valid
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
            if config.normalize_reward:  # details c5-c6: scale by the discounted return's std
                discounted = discounted * config.gamma * (1 - done) + reward
                ret_stats.update(discounted[valid])
                reward = np.clip(reward / math.sqrt(float(ret_stats.var) + 1e-8), -10, 10)
            # Truncated: the episode did not end, it was cut; bootstrap from V(final obs), which
            # next-step autoreset returns now (it resets on the next step).
            cut = truncated & ~terminated & valid
            if cut.any():
                reward[cut] += config.gamma * values(raw_next[cut])
            b_obs[t], b_actions[t], b_out[t], b_values[t] = obs, action, out, value
            b_rewards[t], b_dones[t], b_valid[t] = reward * valid, done, valid
            valid = ~done  # the next step of a done env is its reset step, not a transition
            raw_obs = raw_next
        last_values = values(raw_obs)
        advantages = gae(b_rewards, b_values, b_dones, last_values, config.gamma, config.gae_lambda)
        returns = advantages + b_values

        # -- learn on the valid steps -------------------------------------------------------
        keep = b_valid.reshape(-1)  # (T, N, ...) -> the valid steps' (n, ...), on the device
        f_obs, f_actions, f_out, f_adv, f_ret, f_val = (
            torch.as_tensor(x.reshape(len(keep), *x.shape[2:])[keep], device=device)
            for x in (b_obs, b_actions, b_out, advantages, returns, b_values)
        )
        with torch.no_grad():
            f_logp = agent.log_prob(f_out, f_actions)
        n = len(f_obs)
        size = max(1, n // config.num_minibatches)
        # Per-minibatch diagnostics, reduced once after the update (approx KL and the clip
        # fraction computed per minibatch would cost ~5% of each gradient step).
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("pg", "v", "ent", "log_ratio")}
        for _ in range(config.update_epochs):
            # One minibatch is the whole rollout, which no shuffle changes: no copies then.
            order = torch.randperm(n, generator=sampling, device=device) if size < n else None
            for start in range(0, n, size):
                mb = slice(None) if order is None else order[start : start + size]
                with amp.autocast():
                    out, v = agent(f_obs[mb])
                new_logp, entropy = agent.log_prob(out, f_actions[mb]), agent.entropy(out)
                adv = f_adv[mb]
                if config.norm_adv and len(adv) > 1:  # detail 7
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = clipped_surrogate(new_logp, f_logp[mb], adv, clip)
                v_loss = (v - f_ret[mb]) ** 2
                if config.clip_vloss:  # detail 9
                    v_clipped = f_val[mb] + (v - f_val[mb]).clamp(-clip, clip)
                    v_loss = torch.max(v_loss, (v_clipped - f_ret[mb]) ** 2)
                v_loss = 0.5 * v_loss.mean()
                entropy = entropy.mean()
                loss = pg_loss + config.vf_coef * v_loss
                if config.ent_coef > 0:  # else the entropy is a diagnostic, out of the backward
                    loss = loss - config.ent_coef * entropy
                amp.step(loss, optimizer, params, config.max_grad_norm)
                stats["pg"].append(pg_loss.detach())
                stats["v"].append(v_loss.detach())
                stats["ent"].append(entropy.detach())
                stats["log_ratio"].append((new_logp - f_logp[mb]).detach())
        updates += 1
        y, pred = f_ret.cpu().numpy(), f_val.cpu().numpy()
        explained = 1 - np.var(y - pred) / np.var(y) if np.var(y) > 0 else float("nan")
        now = (step, ctx.timer.elapsed())
        sps = (now[0] - tick[0]) / max(now[1] - tick[1], 1e-9)
        tick = now
        # Approx KL (the unbiased estimator (rho - 1) - log rho) and the fraction of samples
        # whose ratio left the clip range, over every minibatch of the update.
        log_ratio = torch.cat(stats.pop("log_ratio"))
        mean = {k: float(torch.stack(v).mean()) for k, v in stats.items()}
        mean["kl"] = float(((log_ratio.exp() - 1) - log_ratio).mean())
        mean["clip"] = float(((log_ratio.exp() - 1).abs() > clip).float().mean())
        ctx.log_metrics(
            {
                "losses/policy_loss": mean["pg"],
                "losses/value_loss": mean["v"],
                "losses/entropy": mean["ent"],
                "losses/approx_kl": mean["kl"],
                "losses/clipfrac": mean["clip"],
                **({"losses/explained_variance": explained} if math.isfinite(explained) else {}),
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/clip_coef": clip,
                "time/sps": sps,
            },
            step=step,
        )
        if not math.isfinite(mean["pg"] + mean["v"]):
            raise FloatingPointError(f"PPO loss is not finite at timestep {step}")
        if step >= next_eval:
            while next_eval <= step:  # a rollout may pass several evaluation points
                next_eval += config.eval_every
            mean_return = evaluate()
            if config.stop_at_return is not None and mean_return >= config.stop_at_return:
                break
        if step >= next_ckpt:
            while next_ckpt <= step:
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
    obs_dim = int(np.prod(env.observation_space.shape))  # type: ignore[arg-type]
    agent = ActorCritic(
        env.observation_space,
        env.action_space,
        config.hidden_sizes,
        torch.Generator(),
        config.network,
    )
    images = not isinstance(agent.torso, nn.Identity)
    agent.load_state_dict(state["agent"])
    obs_stats = RunningMeanStd((obs_dim,))
    obs_stats.load_state_dict(state["obs_stats"])
    space = env.action_space

    @torch.inference_mode()
    def act(obs: np.ndarray) -> np.ndarray:
        if images:  # the env's bytes, as in training
            out = agent.deterministic(torch.as_tensor(np.asarray(obs))).numpy()
            return out
        x = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        if config.normalize_obs:
            x = obs_stats.normalize(x)
        out = agent.deterministic(torch.as_tensor(x)).numpy()
        return np.clip(out, space.low, space.high) if agent.continuous else out  # type: ignore[attr-defined]

    return act


__all__ = ["Config", "clipped_surrogate", "gae", "load_policy", "train"]
