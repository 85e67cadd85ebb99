"""MuJoCo envs: the extra they need, and their simulator state across a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agents import envstate
from agents.envs import EnvSpec

from .conftest import validate_without


def test_a_mujoco_id_without_the_extra_is_refused_naming_it(tmp_path: Path) -> None:
    spec = tmp_path / "cheetah.yaml"
    spec.write_text("name: cheetah\nalgorithm: sac\nenv:\n  id: HalfCheetah-v5\n")
    out = validate_without("mujoco", spec)
    assert out.returncode == 2, out.stderr
    assert "cheetah.yaml:4: env.id:" in out.stderr, out.stderr
    assert "pip install 'rlgen[mujoco]'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_revived_mujoco_vector_env_goes_on_where_it_was() -> None:
    envs = EnvSpec(id="HalfCheetah-v5").make_vec(2)
    envs.reset(seed=5)
    actions = np.random.default_rng(0).uniform(-1, 1, (40, 2, 6)).astype(np.float32)
    for a in actions[:20]:
        envs.step(a)
    blob = envstate.snapshot(envs)
    assert blob is not None
    revived = envstate.revive(blob)
    for a in actions[20:]:
        want, got = envs.step(a), revived.step(a)
        np.testing.assert_array_equal(want[0], got[0])  # observations, bit for bit
        np.testing.assert_array_equal(want[1], got[1])  # rewards
    # The envs' generators came back too: the next reset's noise is the same.
    np.testing.assert_array_equal(envs.reset()[0], revived.reset()[0])
