"""Reinforcement-learning algorithms: pure PyTorch/NumPy/gymnasium, no Ray or MLflow.

Importing the package registers rlgen's own gymnasium environments (`rlgen/GridWorld-v0`).
"""

from gymnasium.envs.registration import register, registry

if "rlgen/GridWorld-v0" not in registry:
    register(id="rlgen/GridWorld-v0", entry_point="agents.gridworld:GridWorldEnv")
