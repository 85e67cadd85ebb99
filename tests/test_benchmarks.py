"""Smoke runs of every benchmark script with tiny settings, so none of them rots.

Opt-in (`python -m pytest -m bench`) and needs the bench extra (`pip install -e ".[bench]"`):
the peers (scikit-learn, pymdptoolbox) are what the scripts compare against. The MNIST ones read a
synthetic IDX file written here, so nothing depends on ../shared.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10,100 random 28x28 'digits' (the scripts take the first 8,000 and the last 2,000)."""
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    images = (rng.random((10_100, 28, 28)) < 0.2).astype(np.uint8) * 255
    labels = rng.integers(0, 10, size=10_100, dtype=np.uint8)
    for name, array, magic in (
        ("t10k-images-idx3-ubyte.gz", images, 2051),
        ("t10k-labels-idx1-ubyte.gz", labels, 2049),
    ):
        header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))
    return folder


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|---" in result.stdout  # printed its table
    return result.stdout


def test_value_iteration() -> None:
    out = run("value_iteration.py", "--sizes", "20", "30", "--pymdptoolbox-max-states", "400")
    assert "pymdptoolbox" in out and "scipy.sparse loop" in out


def test_logging_overhead() -> None:
    assert "training loop" in run("logging_overhead.py", "--repeats", "1", "--steps", "200")


def test_rbm(fake_mnist: Path) -> None:
    out = run(
        "rbm.py", "--data", str(fake_mnist), "--epochs", "1", "--hidden", "16", "--repeats", "2"
    )
    assert "scikit-learn BernoulliRBM" in out


def test_dbn(fake_mnist: Path) -> None:
    out = run(
        "dbn.py", "--data", str(fake_mnist), "--pretrain-epochs", "1", "--finetune-epochs", "1"
    )
    assert "pretrained (DBN)" in out and "random init" in out


def test_vae(fake_mnist: Path) -> None:
    assert "| mean |" in run("vae.py", "--data", str(fake_mnist), "--epochs", "1", "--seeds", "0")


def test_gan(fake_mnist: Path, tmp_path: Path) -> None:
    out = run(
        "gan.py", "--data", str(fake_mnist), "--epochs", "1", "--grid", str(tmp_path / "g.png")
    )
    assert (tmp_path / "g.png").exists() and "DCGAN" in out


def test_dqn_cartpole() -> None:
    out = run(
        "dqn_cartpole.py",
        *(
            "--seeds",
            "0",
            "--timesteps",
            "2500",
            "--others-seeds",
            "0",
            "--others-timesteps",
            "1000",
        ),
    )
    assert "SB3 steps" in out and "MountainCar-v0" in out and "Acrobot-v1" in out


def test_service_overhead() -> None:
    out = run("service_overhead.py", "--timesteps", "2000", "--trials", "2", "--rounds", "1")
    assert "rlgen run" in out and "HTTP API: POST to SUCCEEDED" in out
    assert "on Ray, concurrent" in out and "side by side (the ceiling)" in out
    assert "as a script (fresh Python)" in out


def test_pbt_against_random_search() -> None:
    out = run("pbt_dqn.py", "--timesteps", "3000", "--members", "2")
    assert "| PBT |" in out and "| random search |" in out


def test_atari_dqn() -> None:
    out = run("atari_dqn.py", "--steps", "1100", "--repeats", "1")
    assert "| rlgen 4 envs |" in out and "| sb3 |" in out
    assert "| rlgen 4 envs, its network alone |" in out


def test_minatar_dqn() -> None:
    out = run("minatar_dqn.py", "--steps", "600", "--eval-every", "300", "--seeds", "0", "1")
    assert "uniform random policy" in out and "against the paper's DQN curve" in out


def test_ppo_sac() -> None:
    out = run("ppo_sac.py", "--ppo-seeds", "0", "--sac-seeds", "0", "--budget-scale", "0.02")
    assert "PPO on CartPole-v1" in out and "SAC on Pendulum-v1" in out
    # Every pair of equal settings gets its ratio, on top of the example against RL-Zoo3's.
    assert "ratio rlgen 256x256 / SB3:" in out and "ratio rlgen / SB3 64x64:" in out


def test_ppo_mujoco() -> None:
    out = run("ppo_mujoco.py", "--steps", "4096", "--seeds", "0", "1", "--jobs", "2")
    assert "rlgen >= SB3 mean - std" in out and "steps/s ratio" in out
