"""DQN on an Atari game: rlgen against Stable-Baselines3 at equal hyperparameters, in one run.

    python benchmarks/atari_dqn.py [--game PongNoFrameskip-v4] [--steps 4000] [--repeats 3]

Both train the Nature CNN with RL-Zoo3's Atari DQN settings (train every 4 steps, batch 32,
lr 1e-4, target update every 1000 env steps, a 100k replay) on the standard preprocessing:
SB3 through `make_atari_env` + `VecFrameStack(4)` (its `AtariWrapper`, one env), rlgen through
`env.preprocessing` (ALE's vector env) with 1 env and with 4 envs (the same hyperparameters per
timestep; the envs step as one batch in ALE's C++ threads), and with 4 envs and bf16 mixed
precision (`precision: bf16-mixed`: the same weights and optimizer, forward passes in bfloat16,
which CPUs with AVX-512 BF16 run faster; not the same arithmetic as SB3's, so a separate row).
Learning starts after 1,000 random steps, so most of each run trains. Reported: steps per
second over each run's clock, which on both sides covers making the envs and the replay as well
as training (rlgen: `dqn.train`, whose training clock starts before it builds them; SB3: its env,
its `DQN` and `learn`), and the replay's bytes per transition at the configured capacity, every
field counted. Runs alternate their order; medians of `--repeats`, and the median of each
repeat's ratio to the same repeat's SB3. Both use every core (`torch.set_num_threads`).

One more row measures rlgen's floor at these settings: its network alone (the 4-env run's
gradient steps and action passes on random stacks, no envs, no replay). Its ratio to SB3 bounds
what any rlgen run could reach here in float32, however little the rest cost.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents import dqn  # noqa: E402
from agents.envs import EnvSpec  # noqa: E402
from agents.replay import FrameStore, ReplayBuffer  # noqa: E402
from benchmarks.peers import warm_up_torch  # noqa: E402
from runctx import RunContext  # noqa: E402
from runctx.accel import MixedPrecision  # noqa: E402

BUFFER, LEARNING_STARTS = 100_000, 1_000
NETWORK_ALONE = "rlgen 4 envs, its network alone"
# RL-Zoo3 hyperparams/dqn.yml, atari (its learning_starts 100k shortened, see the docstring).
SETTINGS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "batch_size": 32,
    "buffer_size": BUFFER,
    "learning_starts": LEARNING_STARTS,
    "train_freq": 4,
    "gradient_steps": 1,
    "exploration_fraction": 0.1,
    "exploration_final_eps": 0.01,
}


def run_sb3(game: str, steps: int, seed: int) -> dict[str, float]:
    from stable_baselines3 import DQN
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from agents.envs import ensure_registered

    ensure_registered(game)
    start = time.perf_counter()  # as rlgen's clock, which covers making its envs and replay
    env = VecFrameStack(make_atari_env(game, n_envs=1, seed=seed), n_stack=4)
    model = DQN(
        "CnnPolicy",
        env,
        target_update_interval=1000,
        seed=seed,
        device="cpu",
        verbose=0,
        **SETTINGS,
    )
    model.learn(steps)
    seconds = time.perf_counter() - start
    buf = model.replay_buffer
    assert buf is not None  # made by `learn`
    fields = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
    nbytes = sum(getattr(buf, f).nbytes for f in fields if getattr(buf, f, None) is not None)
    env.close()
    return {"sps": steps / seconds, "bytes": nbytes / buf.buffer_size}


def rlgen_replay_bytes(n_envs: int, n_step: int = 1, stack: int = 4) -> float:
    """Bytes a transition of rlgen's replay costs at capacity BUFFER (what `dqn.train` builds)."""
    slack = n_envs * stack * (stack + n_step + 2)
    frames = FrameStore(BUFFER + slack, (84, 84), n_envs, torch.device("cpu"))
    buffer = ReplayBuffer(
        BUFFER, (stack,), torch.int64, torch.device("cpu"), torch.Generator(), frames
    )
    total = frames.nbytes() + sum(t.nbytes for t in buffer.fields().values())
    return total / BUFFER


def rlgen_config(steps: int, num_envs: int, precision: str = "fp32") -> dqn.Config:
    return dqn.Config(
        **SETTINGS,
        total_timesteps=steps,
        target_update_interval=250,  # gradient steps: 1000 env steps at train_freq 4
        hidden_sizes=[512],
        num_envs=num_envs,
        precision=precision,
        eval_every=10 * steps,
        eval_episodes=1,
        eval_max_steps=1,  # the final evaluation is not what is measured
        log_every=10**9,
        checkpoint_every=10 * steps,
    )


def run_rlgen(
    game: str, steps: int, seed: int, num_envs: int, precision: str = "fp32"
) -> dict[str, float]:
    config = rlgen_config(steps, num_envs, precision)
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=seed, workdir=d, env=EnvSpec(id=game, preprocessing={}))
        ctx.timer.start()
        dqn.train(config, ctx)
        ctx.close()
    return {"sps": steps / ctx.timer.elapsed(), "bytes": rlgen_replay_bytes(num_envs)}


def run_network_alone(game: str, steps: int, seed: int, num_envs: int) -> dict[str, float]:
    """The network's share of an rlgen run: its gradient steps (target and online passes on 32
    stacks, backward, clipping, Adam: `dqn.td_targets` and `MixedPrecision.step`, as
    `dqn.train` calls them) and its batched action passes, on random stacks, without envs or
    replay. A run at these settings takes at least this long on this machine."""
    config = rlgen_config(steps, num_envs)
    envs = EnvSpec(id=game, preprocessing={}).make_vec(num_envs)  # for the spaces only
    generator = torch.Generator().manual_seed(seed)
    q = dqn.build_network(config, envs, generator)
    envs.close()
    target = copy.deepcopy(q).requires_grad_(False)
    params = list(q.parameters())
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, fused=True)
    amp = MixedPrecision("fp32", torch.device("cpu"))
    stacks = torch.randint(0, 256, (4096, 4, 84, 84), dtype=torch.uint8, generator=generator)
    b = config.batch_size
    trained = max(steps - config.learning_starts, 0)
    acting, updates = trained // num_envs, trained // config.train_freq
    start = time.perf_counter()
    for i in range(max(acting, updates)):
        if i < acting:
            with torch.inference_mode():
                q(stacks[i % 1024 : i % 1024 + num_envs]).argmax(dim=1)
        if i < updates:
            rows = torch.randint(0, len(stacks), (2, b), generator=generator)
            obs, next_obs = stacks.index_select(0, rows[0]), stacks.index_select(0, rows[1])
            with torch.no_grad():
                y = dqn.td_targets(torch.zeros(b), torch.ones(b), target(next_obs), None)
            q_taken = q(obs).gather(1, torch.zeros(b, 1, dtype=torch.int64)).squeeze(1)
            amp.step(F.smooth_l1_loss(q_taken, y), optimizer, params, config.max_grad_norm)
    return {"sps": steps / (time.perf_counter() - start), "bytes": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="PongNoFrameskip-v4")
    parser.add_argument("--steps", type=int, default=4_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())
    warm_up_torch()
    names = ("sb3", "rlgen 1 env", "rlgen 4 envs", "rlgen 4 envs bf16-mixed", NETWORK_ALONE)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    order = list(runs)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            if name == "sb3":
                result = run_sb3(args.game, args.steps, seed=r)
            elif name == NETWORK_ALONE:
                result = run_network_alone(args.game, args.steps, r, 4)
            else:
                precision = "bf16-mixed" if "bf16" in name else "fp32"
                envs = 1 if "1 env" in name else 4
                result = run_rlgen(args.game, args.steps, r, envs, precision)
            runs[name].append(result)
            sys.stdout.write(f"repeat {r}: {name}: {result['sps']:.1f} steps/s\n")
    sb3 = [x["sps"] for x in runs["sb3"]]
    sb3_bytes = runs["sb3"][0]["bytes"]
    sys.stdout.write(
        f"\n{args.game}, {args.steps} steps ({LEARNING_STARTS} random first), "
        f"{torch.get_num_threads()} torch threads, {args.repeats} repeats; paired: the median of "
        "each repeat's ratio to the same repeat's SB3\n"
        "| | steps/s, each repeat | median | vs SB3 (medians) | vs SB3 (paired) "
        "| replay bytes / transition | vs SB3 |\n|---|---|---:|---:|---:|---:|---:|\n"
    )
    for name, results in runs.items():
        sps = [x["sps"] for x in results]
        paired = statistics.median(a / b for a, b in zip(sps, sb3, strict=True))
        nbytes = results[0]["bytes"]
        memory = "" if math.isnan(nbytes) else f"{nbytes:,.0f} | {nbytes / sb3_bytes:.3f}x"
        sys.stdout.write(
            f"| {name} | {', '.join(f'{x:.1f}' for x in sps)} | {statistics.median(sps):.1f} | "
            f"{statistics.median(sps) / statistics.median(sb3):.2f}x | {paired:.2f}x | "
            f"{memory or '- | -'} |\n"
        )


if __name__ == "__main__":
    main()
