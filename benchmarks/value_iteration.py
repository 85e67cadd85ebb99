"""Value iteration on generated gridworlds: rlgen against pymdptoolbox and a plain scipy.sparse loop.

All solvers run in the same process on the same MDP, with the same discount and the same
epsilon-optimal stopping rule, and are reported as ratios (machines are noisy; ratios much less so).

    pip install -e ".[bench]"
    python benchmarks/value_iteration.py                      # 10^4, 10^5, 10^6 states
    python benchmarks/value_iteration.py --sizes 100 --pymdptoolbox-max-states 10000

pymdptoolbox needs a stochastic matrix per action, so terminating transitions are sent to an
absorbing zero-reward state (the goal): the same MDP, the same values. Its constructor validates
the matrices and computes an iteration bound in Python loops; that time is what a user of it waits
for, so "total" counts it, and "run" shows its `run()` alone.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from agents import value_iteration
from agents.gridworld import GridWorldEnv
from agents.mdp import TabularMDP, epsilon_optimal_threshold

GAMMA, EPSILON = 0.99, 1e-6


def scipy_loop(mdp: TabularMDP) -> tuple[float, int, np.ndarray]:
    """The loop a careful user writes with scipy.sparse (float64, int32 indices)."""
    threshold = epsilon_optimal_threshold(EPSILON, GAMMA)
    P, R = mdp.P, mdp.R.reshape(-1)
    A, S = mdp.n_actions, mdp.n_states
    V = np.zeros(S)
    t = time.perf_counter()
    sweeps = 0
    while sweeps < 100_000:
        V_next = (R + GAMMA * (P @ V)).reshape(A, S).max(axis=0)
        residual = np.abs(V_next - V).max()
        V = V_next
        sweeps += 1
        if residual < threshold:
            break
    return time.perf_counter() - t, sweeps, V


def rlgen(mdp: TabularMDP, dtype: torch.dtype) -> tuple[float, int, np.ndarray]:
    t = time.perf_counter()
    model = mdp.to_torch(torch.device("cpu"), dtype)
    sol = value_iteration.solve(model, GAMMA, EPSILON, 100_000)
    return time.perf_counter() - t, len(sol.residuals), sol.V.double().numpy()


def pymdptoolbox(mdp: TabularMDP) -> tuple[float, float, int, np.ndarray]:
    import mdptoolbox.mdp

    S, A = mdp.n_states, mdp.n_actions
    goal = S - 1
    live = ~mdp.terminal
    matrices = []
    for a in range(A):
        Pa = mdp.P[a * S : (a + 1) * S]
        missing = 1.0 - np.asarray(Pa.sum(axis=1)).ravel()  # the terminating mass
        to_goal = sp.csr_matrix(
            (missing[live], (np.flatnonzero(live), np.full(live.sum(), goal))), shape=(S, S)
        )
        absorb = sp.csr_matrix((np.ones((~live).sum()), (np.flatnonzero(~live),) * 2), shape=(S, S))
        matrices.append((Pa + to_goal + absorb).tocsr())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        solver = mdptoolbox.mdp.ValueIteration(
            matrices, mdp.R.T.copy(), GAMMA, epsilon=EPSILON, max_iter=100_000
        )
        t_run = time.perf_counter()
        solver.run()
        end = time.perf_counter()
    return end - t, end - t_run, int(solver.iter), np.asarray(solver.V)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 316, 1000],
        help="grid sides (states = side^2)",
    )
    parser.add_argument(
        "--pymdptoolbox-max-states",
        type=int,
        default=10_000,
        help="skip pymdptoolbox above this many states (its setup is O(S*A) Python)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Warm up every solver once (MKL and scipy set up their kernels on first use).
    warm = GridWorldEnv(size=20, seed=0).transition_model()
    rlgen(warm, torch.float64), rlgen(warm, torch.float32), scipy_loop(warm)

    rows = []
    for side in args.sizes:
        mdp = GridWorldEnv(size=side, slip=0.2, obstacle_density=0.1, seed=0).transition_model()
        S = mdp.n_states
        t64, it64, v64 = rlgen(mdp, torch.float64)
        t32, it32, _ = rlgen(mdp, torch.float32)
        ts, its, vs = scipy_loop(mdp)
        assert np.abs(v64 - vs).max() < 1e-6, "rlgen and scipy disagree"
        row = {
            "states": S,
            "nnz": mdp.P.nnz,
            "rlgen64": (t64, it64),
            "rlgen32": (t32, it32),
            "scipy": (ts, its),
        }
        if args.pymdptoolbox_max_states >= S:
            tp, tp_run, itp, vp = pymdptoolbox(mdp)
            assert np.abs(v64 - vp).max() < 1e-3, "rlgen and pymdptoolbox disagree"
            row["pymdp"] = (tp, itp, tp_run)
        rows.append(row)

    print(
        f"Value iteration, slippery gridworld (slip 0.2, 10% obstacles), gamma {GAMMA}, "
        f"epsilon {EPSILON}, float64 unless noted, {args.threads} threads\n"
    )
    print("| states | solver | sweeps | ms / sweep | total s | total vs rlgen | sweep vs rlgen |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        t64, it64 = row["rlgen64"]
        base_sweep = t64 / it64
        entries = [
            ("rlgen (torch CSR)", t64, it64),
            ("rlgen float32", *row["rlgen32"]),
            ("scipy.sparse loop", *row["scipy"]),
        ]
        if "pymdp" in row:
            tp, itp, tp_run = row["pymdp"]
            entries.append(("pymdptoolbox (setup + run)", tp, itp))
            entries.append(("pymdptoolbox run() only", tp_run, itp))
        for name, total, sweeps in entries:
            # Setup + run per sweep means nothing: only run() and the loops have a sweep time.
            per_sweep = "" if "setup" in name else f"{total / sweeps * 1e3:.3f}"
            ratio = "" if "setup" in name else f"{(total / sweeps) / base_sweep:.1f}x"
            print(
                f"| {row['states']:,} | {name} | {sweeps} | {per_sweep} | {total:.3f} | "
                f"{total / t64:.1f}x | {ratio} |"
            )


if __name__ == "__main__":
    main()
