"""DQN (Mnih et al. 2015) with its standard improvements, on gymnasium vector envs.

    y = G + d * Q_target(s', argmax_a' Q_net(s', a'))  (Double DQN, van Hasselt et al. 2016)
    y = G + d * max_a' Q_target(s', a')                (plain DQN)
    loss = mean_i w_i * huber(Q_net(s_i, a_i) - y_i)

with G the n-step return and d = gamma^k (1 - terminated) its bootstrap discount (see
`agents.replay`); time-limit truncation bootstraps, termination does not. Options: dueling heads
(Wang et al. 2016), n-step returns, proportional prioritized replay (Schaul et al. 2016) with
importance weights w_i, hard or Polyak target updates, several envs stepped as one batch.

Pixels: image observations go through a convolutional torso before the MLP (the Nature CNN of
Mnih et al. 2015 for Atari's 84x84 frame stacks, the one-layer CNN of Young & Tian 2019 for
MinAtar's 10x10 grids), fed the env's own bytes; stacked frames are stored once each in replay
(`agents.replay.FrameStore`).

Counting: a *timestep* is one transition (one env step that is not gymnasium's reset step), so
`total_timesteps`, `train_freq`, `eval_every` and exploration mean the same for any `num_envs`.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.spaces.utils import flatten, flatten_space
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import FlattenObservation
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from agents import envstate
from agents.evaluation import evaluate_and_log, length_metric
from agents.nets import (
    MinAtarCNN,
    NatureCNN,
    default_init_,
    image_torso,
    network_problem,
    update_target,
)
from agents.plots import learning_curve, observation_frames
from agents.replay import Batch, FrameStore, NStep, PrioritizedReplayBuffer, ReplayBuffer
from agents.schedules import linear_schedule
from agents.spaces import buffer_obs_dtype, is_composite, takes
from runctx import RunContext
from runctx.accel import Compile, MixedPrecision, Precision, compile_modules
from runctx.checkpoints import capture


class Config(BaseModel):
    """Defaults: the RL-Zoo3 (Raffin 2020) tuned DQN for CartPole-v1, with SB3's DQN defaults
    for what RL-Zoo does not set; every improvement off, so the defaults are plain DQN."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    total_timesteps: int = Field(50_000, gt=0, description="Transitions to collect.")
    learning_rate: float = Field(2.3e-3, gt=0, description="The optimizer's step size.")
    optimizer: Literal["adam", "rmsprop"] = Field(
        "adam",
        description="Adam, or the DQN papers' centred RMSprop (squared-gradient decay 0.95, "
        "eps 0.01: Mnih et al. 2015; MinAtar, Young & Tian 2019).",
    )
    final_learning_rate: float | None = Field(
        None,
        ge=0,
        description="Anneal the step size linearly to this by the end (None: constant). "
        "Steadies the final policy where late updates keep it oscillating (MountainCar).",
    )
    batch_size: int = Field(64, gt=0, description="Transitions per gradient step.")
    buffer_size: int = Field(100_000, gt=0, description="Replay capacity in transitions.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    hidden_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [256, 256],
        description="Widths of the Q-network's hidden layers (after the CNN, for images: the "
        "Nature DQN's is [512], MinAtar's [128]).",
    )
    network: Literal["auto", "mlp", "nature_cnn", "minatar_cnn"] = Field(
        "auto",
        description="Torso for observations: auto picks the Nature CNN for images of 36+ "
        "pixels a side, the MinAtar CNN for smaller grids, an MLP for everything else.",
    )
    frame_replay: bool = Field(
        True,
        description="Store each frame of stacked image observations once in replay (about one "
        "frame a transition instead of two stacks).",
    )
    learning_starts: int = Field(
        1_000, ge=0, description="Transitions collected (uniformly at random) before learning."
    )
    train_freq: int = Field(256, gt=0, description="Transitions collected between updates.")
    gradient_steps: int = Field(128, gt=0, description="Gradient steps per update.")
    target_update_interval: int = Field(
        128,
        gt=0,
        description="Gradient steps between target-network updates. RL-Zoo's 10 env steps "
        "with train_freq 256 amount to one hard update per round of gradient steps.",
    )
    tau: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Target update theta' <- tau theta + (1 - tau) theta': 1 copies (hard), "
        "<1 is Polyak averaging (use target_update_interval 1 for every step).",
    )
    loss: Literal["huber", "mse"] = Field("huber", description="TD loss (Huber, delta 1).")
    max_grad_norm: float | None = Field(
        10.0, gt=0, description="Clip the gradient's global norm (None: no clipping)."
    )
    exploration_initial_eps: float = Field(1.0, ge=0, le=1, description="Initial epsilon.")
    exploration_final_eps: float = Field(0.04, ge=0, le=1, description="Final epsilon.")
    exploration_fraction: float = Field(
        0.16, ge=0, le=1, description="Fraction of total_timesteps over which epsilon decays."
    )
    double_dqn: bool = Field(False, description="Double DQN targets.")
    dueling: bool = Field(False, description="Dueling value/advantage heads.")
    normalize_obs: bool = Field(
        False,
        description="Rescale observation dimensions with finite bounds to [-1, 1] inside the "
        "network (MountainCar's velocity spans +-0.07, its position 1.8).",
    )
    distributional: bool = Field(
        False, description="C51: learn the distribution of returns on a fixed support."
    )
    atoms: int = Field(51, ge=2, le=1001, description="C51's number of support atoms.")
    v_min: float = Field(-10.0, description="C51's smallest return on the support.")
    v_max: float = Field(10.0, description="C51's largest return on the support.")
    noisy: bool = Field(
        False,
        description="Noisy nets: factorised Gaussian noise in every fully connected layer "
        "explores instead of epsilon (set the exploration epsilons to 0 with it).",
    )
    noisy_sigma0: float = Field(0.5, gt=0, description="Initial noise scale sigma_0.")
    n_step: int = Field(1, ge=1, le=100, description="Steps in the bootstrapped return.")
    prioritized_replay: bool = Field(False, description="Proportional prioritized replay.")
    priority_alpha: float = Field(0.6, ge=0, description="Prioritization exponent alpha.")
    priority_beta: float = Field(
        0.4, ge=0, le=1, description="Initial importance exponent beta, annealed to 1."
    )
    priority_eps: float = Field(1e-6, gt=0, description="Added to |TD error| for priorities.")
    num_envs: int = Field(1, ge=1, le=1024, description="Envs stepped as one batch.")
    eval_every: int = Field(2_500, gt=0, description="Timesteps between evaluations.")
    eval_episodes: int = Field(10, ge=1, le=1000, description="Greedy episodes per evaluation.")
    eval_max_steps: int = Field(
        10_000,
        gt=0,
        description="Cap on an evaluation episode in envs without a time limit (CliffWalking), "
        "where a greedy policy that loops would never end.",
    )
    stop_at_return: float | None = Field(
        None, description="Stop once an evaluation's mean return reaches this."
    )
    log_every: int = Field(
        100, gt=0, description="Gradient steps between loss metrics (at most one log a step)."
    )
    precision: Precision = "fp32"
    compile: Compile = False
    checkpoint_every: int = Field(
        10_000, gt=0, description="Timesteps between checkpoints (and at the end)."
    )
    checkpoint_buffer: bool = Field(
        False, description="Include the replay buffer in checkpoints (large, exact resume)."
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.batch_size > self.buffer_size:
            raise ValueError("batch_size must not exceed buffer_size")
        if self.exploration_final_eps > self.exploration_initial_eps:
            raise ValueError("exploration_final_eps must not exceed exploration_initial_eps")
        if self.distributional and self.v_min >= self.v_max:
            raise ValueError("v_min must be below v_max")
        return self


# What a run logs (see the registry).
METRICS = (
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/epsilon",
    "charts/updates",
    "charts/episodes",
    "losses/td_loss",
    "losses/q_values",
    "eval/return_mean",
    "eval/return_std",
    "eval/length_mean",
    "time/sps",
    "time/train_s",
)


def resume_problem(config: Config) -> str | None:
    """Why a restart of this config would not continue the same trajectory, or None."""
    if not config.checkpoint_buffer:
        return (
            "params.checkpoint_buffer is false: a restarted trial would refill its replay "
            "buffer from scratch; set it to true to allow restarts"
        )
    return None


def check_env(env: gym.Env, config: Config | None = None) -> str | None:
    """Why DQN with `config` (None: the defaults) cannot run on `env`, or None."""
    if not isinstance(env.action_space, gym.spaces.Discrete):
        return f"DQN needs a discrete action space, not {env.action_space}"
    space = env.observation_space
    if not takes(space):
        return (
            "DQN needs a Box, MultiBinary, Discrete or MultiDiscrete observation space, or a "
            f"Tuple/Dict of them, not {space}"
        )
    network = config.network if config is not None else "auto"
    return network_problem(network, flatten_space(space) if is_composite(space) else space)


class NoisyLinear(nn.Module):
    """Factorised Gaussian noisy linear layer (Fortunato et al. 2018, eqs. 10-11):

        y = (mu_w + sigma_w * (f(e_out) f(e_in)^T)) x + mu_b + sigma_b * f(e_out),
        f(e) = sign(e) sqrt(|e|),  e ~ N(0, 1),

    mu ~ U(-1/sqrt(p), 1/sqrt(p)) and sigma = sigma0 / sqrt(p) at initialisation (p inputs).
    The noise is redrawn by `reset_noise` from the trial's generator, and kept as buffers so a
    checkpoint holds it; in eval mode the layer is deterministic (mu only)."""

    def __init__(self, p: int, q: int, sigma0: float, generator: torch.Generator | None):
        super().__init__()
        bound = 1 / math.sqrt(p)
        self.mu_w = nn.Parameter(torch.empty(q, p).uniform_(-bound, bound, generator=generator))
        self.mu_b = nn.Parameter(torch.empty(q).uniform_(-bound, bound, generator=generator))
        self.sigma_w = nn.Parameter(torch.full((q, p), sigma0 * bound))
        self.sigma_b = nn.Parameter(torch.full((q,), sigma0 * bound))
        self.register_buffer("e_in", torch.zeros(p))
        self.register_buffer("e_out", torch.zeros(q))

    e_in: torch.Tensor
    e_out: torch.Tensor

    def reset_noise(self, generator: torch.Generator) -> None:
        def f(n: int) -> torch.Tensor:
            e = torch.randn(n, generator=generator, device=generator.device)
            return e.sign() * e.abs().sqrt()

        self.e_in.copy_(f(len(self.e_in)))
        self.e_out.copy_(f(len(self.e_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.mu_w, self.mu_b)
        w = self.mu_w + self.sigma_w * torch.outer(self.e_out, self.e_in)
        return F.linear(x, w, self.mu_b + self.sigma_b * self.e_out)


class QNetwork(nn.Module):
    """MLP: obs (B, *obs_shape) -> Q (B, A). Dueling: Q = V + A - mean_a A (Wang et al., eq. 9).

    Integer observations (Discrete: (B,), MultiDiscrete: (B, *nvec.shape)) enter as the
    concatenated one-hot codes of their components, (B, sum(nvec)); see `set_discrete_obs`.
    Images go through `torso` (a CNN) first.

    Distributional (C51, Bellemare et al. 2017): with `atoms` > 1 the heads give logits (B, A,
    atoms) of a categorical distribution over the fixed support z (`support`), and
    Q(s, a) = sum_i z_i p_i(s, a); dueling combines the logits per atom (Hessel et al. 2018).
    `noisy_sigma0`: every fully connected layer is a `NoisyLinear`.
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden: list[int],
        dueling: bool,
        generator: torch.Generator | None = None,
        torso: NatureCNN | MinAtarCNN | None = None,
        atoms: int = 1,
        support: tuple[float, float] = (-10.0, 10.0),
        noisy_sigma0: float | None = None,
    ):
        super().__init__()
        self.torso = torso
        if torso is not None:
            obs_dim = torso.out_dim
        self.in_dim = obs_dim
        self.n_actions, self.atoms = n_actions, atoms
        widths = [obs_dim, *hidden]

        def linear(p: int, q: int) -> nn.Module:
            if noisy_sigma0 is None:
                return nn.Linear(p, q)
            return NoisyLinear(p, q, noisy_sigma0, generator)

        self.hidden = nn.ModuleList(linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = linear(widths[-1], n_actions * atoms)
        self.value = linear(widths[-1], atoms) if dueling else None
        self.register_buffer("support", torch.linspace(*support, atoms) if atoms > 1 else None)
        self.register_buffer("obs_center", None)
        self.register_buffer("obs_scale", None)
        self.register_buffer("onehot_shift", None)
        if generator is not None:
            default_init_(self, generator)

    support: torch.Tensor | None
    obs_center: torch.Tensor | None
    obs_scale: torch.Tensor | None
    onehot_shift: torch.Tensor | None

    def set_obs_bounds(self, low: np.ndarray, high: np.ndarray) -> None:
        """Map [low, high] to [-1, 1] where both bounds are finite; other dimensions pass as is.
        Buffers, so checkpoints and `rlgen evaluate` carry them."""
        finite = np.isfinite(low) & np.isfinite(high) & (high > low)
        low, high = np.where(finite, low, -1.0), np.where(finite, high, 1.0)  # no inf - inf
        center = np.where(finite, (high + low) / 2, 0.0)
        scale = np.where(finite, 2 / (high - low), 1.0)
        self.obs_center = torch.as_tensor(center, dtype=torch.float32)
        self.obs_scale = torch.as_tensor(scale, dtype=torch.float32)

    def set_discrete_obs(self, start: np.ndarray, sizes: np.ndarray) -> None:
        """Component i, an integer in [start_i, start_i + sizes_i), sets input unit
        obs_i - start_i + sum_{j<i} sizes_j. A buffer, so checkpoints carry it."""
        offsets = np.cumsum(sizes) - sizes
        self.onehot_shift = torch.as_tensor(offsets - start, dtype=torch.int64)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, *obs_shape) -> (B, A, atoms): Q-values (atoms = 1) or distribution logits."""
        if self.torso is not None:
            h = self.torso(obs)
        elif self.onehot_shift is not None:
            idx = obs.reshape(len(obs), -1).long() + self.onehot_shift  # (B, k)
            h = torch.zeros(len(obs), self.in_dim, device=obs.device).scatter_(1, idx, 1.0)
        else:
            h = obs.flatten(1).float()  # the buffer may hold integers (uint8 images, bits)
        if self.obs_center is not None and self.obs_scale is not None:
            h = (h - self.obs_center) * self.obs_scale
        for layer in self.hidden:
            h = torch.relu(layer(h))  # (B, width)
        adv = self.head(h).view(len(h), self.n_actions, self.atoms)  # (B, A, atoms)
        if self.value is not None:
            adv = self.value(h).unsqueeze(1) + adv - adv.mean(dim=1, keepdim=True)
        return adv.float()  # float32 out of mixed-precision forward passes

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, *obs_shape) -> Q (B, A)."""
        out = self.logits(obs)
        if self.support is None:
            return out.squeeze(2)
        return (out.softmax(dim=2) * self.support).sum(dim=2)

    def reset_noise(self, generator: torch.Generator) -> None:
        """New noise in every noisy layer (none without `noisy_sigma0`)."""
        for m in self.modules():
            if isinstance(m, NoisyLinear):
                m.reset_noise(generator)


def project_distribution(
    next_probs: torch.Tensor, returns: torch.Tensor, discounts: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """C51's target (Bellemare et al. 2017, Algorithm 1): the distribution of G + d Z(s', a*),
    atoms Tz_j = G + d z_j clipped to [z_0, z_{N-1}], projected back onto the support z by
    splitting each atom's mass between its two neighbours in proportion to closeness.

    next_probs (B, N), returns and discounts (B,), z (N,) evenly spaced -> (B, N), rows sum to 1.
    """
    n = len(z)
    dz = (z[-1] - z[0]) / (n - 1)
    tz = (returns.unsqueeze(1) + discounts.unsqueeze(1) * z).clamp(z[0], z[-1])  # (B, N)
    b = ((tz - z[0]) / dz).clamp(0, n - 1)  # fractional index of each target atom
    lower, upper = b.floor().long(), b.ceil().long()
    # An atom landing exactly on z_l (l == u) gives it all its mass: (u - b) + (b - l) would be 0.
    w_lower = torch.where(lower == upper, 1.0, upper - b)
    out = torch.zeros_like(next_probs)
    out.scatter_add_(1, lower, next_probs * w_lower)
    out.scatter_add_(1, upper, next_probs * (b - lower))
    return out


def td_targets(
    batch_returns: torch.Tensor,
    discounts: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None,
) -> torch.Tensor:
    """y = G + d * Q_target(s', a*), a* from the online net (Double DQN) or the target net.

    next_q_target, next_q_online: (B, A); returns (B,).
    """
    if next_q_online is None:
        best = next_q_target.amax(dim=1)
    else:
        best = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)
    return batch_returns + discounts * best


def build_network(
    config: Config, env: gym.Env | gym.vector.VectorEnv, generator: torch.Generator | None = None
) -> QNetwork:
    space: Any = getattr(env, "single_observation_space", env.observation_space)
    if is_composite(space):  # a raw env's (`load_policy`); train's envs flatten already
        space = flatten_space(space)
    actions: Any = getattr(env, "single_action_space", env.action_space)
    if isinstance(space, gym.spaces.Discrete):
        start, sizes = np.array([int(space.start)]), np.array([int(space.n)])
    elif isinstance(space, gym.spaces.MultiDiscrete):
        start, sizes = np.asarray(space.start).ravel(), np.asarray(space.nvec).ravel()
    else:
        start, sizes = None, None
    in_dim = int(sizes.sum()) if sizes is not None else int(np.prod(space.shape))
    torso = image_torso(config.network, space)
    q = QNetwork(
        in_dim,
        int(actions.n),
        config.hidden_sizes,
        config.dueling,
        generator,
        torso,
        atoms=config.atoms if config.distributional else 1,
        support=(config.v_min, config.v_max),
        noisy_sigma0=config.noisy_sigma0 if config.noisy else None,
    )
    if start is not None and sizes is not None:
        q.set_discrete_obs(start, sizes)
    elif config.normalize_obs and isinstance(space, gym.spaces.Box):
        q.set_obs_bounds(np.asarray(space.low).ravel(), np.asarray(space.high).ravel())
    return q


def stacked_frames(space: Any) -> bool:
    """Observations that are stacks of frames, (S, H, W) bytes (Atari preprocessing)."""
    return (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[0] < space.shape[1]
    )


def greedy_actor(q: QNetwork, device: torch.device, start: int = 0) -> Any:
    """obs (N, *obs_shape) numpy -> greedy actions (N,) numpy, as the env takes them: output
    column i of the network is action `start + i` (Discrete(n, start=-1) takes -1..n-2).
    Observations cross to the device in their own dtype (images as bytes)."""

    @torch.inference_mode()
    def act(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs), device=device)
        return q(x).argmax(dim=1).cpu().numpy() + start

    return act


def train(config: Config, ctx: RunContext) -> None:
    device = ctx.device
    envs = ctx.make_vec_env(config.num_envs)
    eval_envs = ctx.make_vec_env(config.eval_episodes, evaluation=True)
    obs_dtype = buffer_obs_dtype(envs.single_observation_space)  # of the env's own space
    if is_composite(envs.single_observation_space):  # Tuple/Dict: (N, flat size) arrays
        envs, eval_envs = FlattenObservation(envs), FlattenObservation(eval_envs)
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
        raise ValueError(f"unsupported vector-env autoreset mode {mode}")
    n_envs = config.num_envs
    obs_shape = envs.single_observation_space.shape
    assert obs_shape is not None
    # Independent random streams: exploration (which envs explore, and their random actions),
    # replay sampling and the network's initial weights never share a generator.
    explore_rng = ctx.rng("exploration")
    envs.action_space.seed(int(explore_rng.integers(2**31)))
    replay_rng = ctx.torch_generator("replay", device=device)
    noise = ctx.torch_generator("noise", device=device) if config.noisy else None
    # Discrete(n, start): network column i is action start + i; the buffer holds column indices.
    a0 = int(envs.single_action_space.start)  # type: ignore[attr-defined]

    q = build_network(config, envs, ctx.torch_generator("init", device="cpu")).to(device)
    target = copy.deepcopy(q).requires_grad_(False)
    params = list(q.parameters())
    optimizer: torch.optim.Optimizer
    if config.optimizer == "rmsprop":
        # Centred: the step divides by sqrt(E[g^2] - E[g]^2) + eps; an eps of 0.01 (against
        # Adam's 1e-8) keeps the steps of parameters with tiny gradients small.
        optimizer = torch.optim.RMSprop(
            params, lr=config.learning_rate, alpha=0.95, eps=0.01, centered=True
        )
    else:  # fused: one kernel for all parameters instead of one per tensor
        optimizer = torch.optim.Adam(params, lr=config.learning_rate, fused=True)
    buffer_args: dict[str, Any] = {
        "capacity": config.buffer_size,
        "obs_shape": obs_shape,
        "obs_dtype": obs_dtype,
        "device": device,
        "generator": replay_rng,
    }
    frames: FrameStore | None = None
    if config.frame_replay and stacked_frames(envs.single_observation_space):
        # Stacks of S frames: the buffer holds S frame ids per observation. The store's slack
        # covers the frames of transitions still pending in n-step windows and stacks.
        s = obs_shape[0]
        slack = n_envs * s * (s + config.n_step + 2)
        frames = FrameStore(config.buffer_size + slack, obs_shape[1:], n_envs, device)
        buffer_args |= {"obs_shape": (s,), "obs_dtype": torch.int64, "frames": frames}
    buffer: ReplayBuffer = (
        PrioritizedReplayBuffer(**buffer_args, alpha=config.priority_alpha, eps=config.priority_eps)
        if config.prioritized_replay
        else ReplayBuffer(**buffer_args)
    )
    nstep = NStep(config.n_step, n_envs, config.gamma)
    loss_fn = F.smooth_l1_loss if config.loss == "huber" else F.mse_loss
    # Mixed precision: forward passes autocast (the network returns float32).
    amp = MixedPrecision(config.precision, device)
    compile_modules(config.compile, q, target, device=device)
    act = greedy_actor(q, device, a0)

    # Everything the trajectory depends on besides the counters below and the envs: a
    # checkpoint holds all of it, so a resumed run takes the same steps the uninterrupted one
    # would (with `checkpoint_buffer`; without, it refills the buffer from where it was).
    state: dict[str, Any] = {
        "q": q,
        "target": target,
        "optimizer": optimizer,
        "explore_rng": explore_rng,
        "action_rng": envs.action_space.np_random,
        "replay_rng": replay_rng,
        "nstep": nstep,
        **({"noise": noise} if noise is not None else {}),
        **amp.state(),
        **({"buffer": buffer} if config.checkpoint_buffer else {}),
        **({"frames": frames} if config.checkpoint_buffer and frames is not None else {}),
    }
    # Counters (all in timesteps, except `updates`).
    step, updates, episodes = 0, 0, 0
    next_train = config.learning_starts + config.train_freq
    next_eval, next_ckpt = config.eval_every, config.checkpoint_every
    evals: list[tuple[int, float, float]] = []  # (step, mean, std)
    history: list[tuple[int, float]] = []  # (step, return) of training episodes, for the figure
    loss_sum = torch.zeros((), device=device)  # summed since the last loss metric
    q_sum = torch.zeros((), device=device)
    losses_logged = 0  # `updates` at the last loss metric
    obs, _ = envs.reset(seed=ctx.seed)
    valid = np.ones(n_envs, dtype=bool)  # False on next-step autoreset's reset step
    ep_return, ep_length = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
    if (saved := ctx.checkpoints.restore(state)) is not None:
        step, updates, episodes = saved["step"], saved["updates"], saved["episodes"]
        next_train, next_eval, next_ckpt = (
            saved["next_train"],
            saved["next_eval"],
            saved["next_ckpt"],
        )
        evals = [(int(s), m, sd) for s, m, sd in saved["evals"].tolist()]
        history = [(int(s), r) for s, r in saved["history"].tolist()]
        loss_sum.copy_(saved["loss_sum"])
        q_sum.copy_(saved["q_sum"])
        losses_logged = saved["losses_logged"]
        if "envs" in saved:  # inside the episodes the run was in
            envs.close()
            envs = envstate.revive(saved["envs"])
            state["action_rng"] = envs.action_space.np_random  # the revived one, same state
            obs, valid = saved["obs"].numpy(), saved["valid"].numpy()
            ep_return, ep_length = saved["ep_return"].numpy(), saved["ep_length"].numpy()
        else:  # an env that does not pickle: fresh episodes
            obs, _ = envs.reset(seed=ctx.seed + step)
            nstep.reset()
            if frames is not None:
                frames.forget_episodes()
        for group in optimizer.param_groups:  # the config's, should it differ (PBT)
            group["lr"] = config.learning_rate
        ctx.log.info("resumed from the checkpoint at timestep %d", step)
    elif len(obs_shape) == 3:  # what the network sees, as a figure (off the training clock)
        with ctx.timer.paused():
            channels_first = stacked_frames(envs.single_observation_space)
            figure = observation_frames(np.asarray(obs[0]), channels_first, "Observation")
            ctx.log_figure(figure, "observation")

    def checkpoint() -> None:
        with ctx.timer.paused():
            ctx.checkpoints.save(
                {
                    **capture(state),
                    "step": step,
                    "updates": updates,
                    "episodes": episodes,
                    "next_train": next_train,
                    "next_eval": next_eval,
                    "next_ckpt": next_ckpt,
                    "evals": torch.tensor(evals, dtype=torch.float64).reshape(-1, 3),
                    "history": torch.tensor(history, dtype=torch.float64).reshape(-1, 2),
                    "loss_sum": loss_sum.cpu(),
                    "q_sum": q_sum.cpu(),
                    "losses_logged": losses_logged,
                    "config": config.model_dump(mode="json"),
                    **envstate.episodes_state(
                        envs, obs=obs, valid=valid, ep_return=ep_return, ep_length=ep_length
                    ),
                },
                step=step,
            )

    def evaluate() -> float:
        q.eval()  # noisy nets: the mean weights
        mean, std = evaluate_and_log(
            ctx, eval_envs, act, config.eval_episodes, config.eval_max_steps, step
        )
        q.train()
        evals.append((step, mean, std))
        return mean

    def categorical_loss(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """C51: per-sample cross-entropy between the projected target distribution and the
        predicted one, (B,), and Q(s, a), (B,)."""
        z = q.support
        assert z is not None
        rows = torch.arange(len(batch.actions), device=device)
        with torch.no_grad():
            next_probs = target.logits(batch.next_obs).softmax(dim=2)  # (B, A, N)
            chooser = q(batch.next_obs) if config.double_dqn else (next_probs * z).sum(dim=2)
            best = next_probs[rows, chooser.argmax(dim=1)]  # (B, N)
            m = project_distribution(best, batch.returns, batch.discounts, z)
        logits = q.logits(batch.obs)[rows, batch.actions]  # (B, N)
        q_taken = (logits.detach().softmax(dim=1) * z).sum(dim=1)
        return -(m * logits.log_softmax(dim=1)).sum(dim=1), q_taken

    def gradient_step() -> tuple[torch.Tensor, torch.Tensor]:
        batch = buffer.sample(config.batch_size)
        if noise is not None:  # fresh noise for this update, independent in the two networks
            q.reset_noise(noise)
            target.reset_noise(noise)
        with amp.autocast():
            loss, q_taken = loss_of(batch)
        amp.step(loss, optimizer, params, config.max_grad_norm)
        return loss.detach(), q_taken.detach().mean()

    def loss_of(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss, (), and Q(s, a), (B,); updates the priorities."""
        if config.distributional:
            per_sample, q_taken = categorical_loss(batch)
            weighted = per_sample if batch.weights is None else batch.weights * per_sample
            loss = weighted.mean()
            # Rainbow's priorities: the distributional loss itself.
            buffer.update_priorities(batch.indices, per_sample.detach())
        else:
            with torch.no_grad():
                next_q_target = target(batch.next_obs)
                next_q_online = q(batch.next_obs) if config.double_dqn else None
                y = td_targets(batch.returns, batch.discounts, next_q_target, next_q_online)
            q_taken = q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)  # (B,)
            if batch.weights is None:
                loss = loss_fn(q_taken, y)
            else:
                loss = (batch.weights * loss_fn(q_taken, y, reduction="none")).mean()
                buffer.update_priorities(batch.indices, q_taken.detach() - y)
        return loss, q_taken

    explore_steps = config.exploration_fraction * config.total_timesteps
    tick = (step, ctx.timer.elapsed())
    while step < config.total_timesteps and not ctx.should_stop():
        # -- act: epsilon-greedy, one batched forward pass for the envs that do not explore ----
        eps = linear_schedule(
            config.exploration_initial_eps, config.exploration_final_eps, explore_steps, step
        )
        if step < config.learning_starts:
            eps = 1.0
        explore = explore_rng.random(n_envs) < eps
        actions = envs.action_space.sample()
        if not explore.all():
            if noise is not None:  # noisy nets: new noise for each acting step
                q.reset_noise(noise)
            with amp.autocast():
                greedy = act(obs)
            actions = np.where(explore, actions, greedy)
        next_obs, rewards, terminated, truncated, info = envs.step(actions)
        done = terminated | truncated
        # -- store --------------------------------------------------------------------------
        final = next_obs  # next-step autoreset returns the last obs and resets on the next step
        if mode == AutoresetMode.SAME_STEP and done.any():  # it returned the reset obs already
            final = next_obs.copy()
            for e in np.flatnonzero(done):
                final[e] = info["final_obs"][e]
        if frames is not None:  # stacks as frame ids, each new frame stored once
            stored, stored_final = frames.intern(obs), frames.intern(final)
        else:
            stored, stored_final = obs, final
        buffer.add(nstep.push(stored, actions - a0, rewards, stored_final, terminated, done, valid))
        k = int(valid.sum())
        step += k
        ep_return += rewards * valid
        ep_length += valid
        for e in np.flatnonzero(done & valid):
            episodes += 1
            history.append((step, float(ep_return[e])))
            ctx.log_metrics(
                {
                    "charts/episodic_return": ep_return[e],
                    **length_metric("charts/episodic_length", ep_return[e], ep_length[e]),
                },
                step=step,
            )
        ep_return[done], ep_length[done] = 0.0, 0
        if mode == AutoresetMode.NEXT_STEP:
            valid = ~done
        obs = next_obs

        # -- learn ----------------------------------------------------------------------------
        while step >= next_train:
            next_train += config.train_freq
            if buffer.size < config.batch_size:  # n-step windows still filling up
                continue
            if config.final_learning_rate is not None:
                lr = linear_schedule(
                    config.learning_rate, config.final_learning_rate, config.total_timesteps, step
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
            if config.prioritized_replay:  # anneal beta from its initial value to 1
                buffer.beta = linear_schedule(  # type: ignore[attr-defined]
                    config.priority_beta, 1.0, config.total_timesteps, step
                )
            for _ in range(config.gradient_steps):
                loss, q_mean = gradient_step()
                loss_sum += loss
                q_sum += q_mean
                updates += 1
                if updates % config.target_update_interval == 0:
                    update_target(target, q, config.tau)
            if updates - losses_logged >= config.log_every:  # once per step at most
                now = (step, ctx.timer.elapsed())
                sps = (now[0] - tick[0]) / max(now[1] - tick[1], 1e-9)
                tick = now
                n = updates - losses_logged
                losses_logged = updates
                # Read from the device once a log, not once an update (no host sync a step).
                mean_loss = float(loss_sum) / n
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"TD loss is {mean_loss} at timestep {step}")
                ctx.log_metrics(
                    {
                        "losses/td_loss": mean_loss,
                        "losses/q_values": q_sum / n,
                        "charts/epsilon": eps,
                        "charts/updates": updates,
                        "charts/episodes": episodes,  # a line over training, not one end point
                        "time/sps": sps,
                    },
                    step=step,
                )
                loss_sum.zero_()
                q_sum.zero_()

        # -- evaluate and checkpoint ----------------------------------------------------------
        if step >= next_eval:
            next_eval += config.eval_every
            mean = evaluate()
            if config.stop_at_return is not None and mean >= config.stop_at_return:
                ctx.log.info(
                    "evaluation mean %.1f reached %.1f at timestep %d",
                    mean,
                    config.stop_at_return,
                    step,
                )
                break
        if step >= next_ckpt:
            next_ckpt += config.checkpoint_every
            checkpoint()

    ctx.timer.stop()
    if not evals or evals[-1][0] != step:
        evaluate()
    checkpoint()
    ctx.log_metrics({"charts/episodes": episodes, "charts/updates": updates}, step=step)
    with ctx.timer.paused():
        title = f"DQN on {ctx.env.id if ctx.env else 'env'}, seed {ctx.seed}"
        ctx.log_figure(
            learning_curve(history, evals, config.stop_at_return, title), "learning_curve"
        )
    envs.close()
    eval_envs.close()


def load_policy(config: Config, state: dict[str, Any], env: gym.Env) -> Any:
    """The greedy policy of a checkpoint, for `rlgen evaluate`: obs (N, ...) -> actions (N,);
    with Tuple/Dict observations, a sequence of N of the env's own observations."""
    q = build_network(config, env)
    q.load_state_dict(state["q"])
    q.eval()
    actions: Any = getattr(env, "single_action_space", env.action_space)
    act = greedy_actor(q, torch.device("cpu"), int(actions.start))
    space = env.observation_space
    if is_composite(space):
        # flatten returns an array for these spaces (a Dict/Tuple only for Graph/Sequence parts)
        return lambda batch: act(np.stack([np.asarray(flatten(space, o)) for o in batch]))
    return act
