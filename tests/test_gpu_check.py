"""benchmarks/gpu_check.py on the CPU with tiny sizes: the GPU check must not rot where no GPU
is (it runs the same code with `--device cuda` on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_the_gpu_check_runs_examples_and_throughput_and_writes_its_section(
    tmp_path: Path,
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nearlier tables\n")
    args = ["--device", "cpu", "--quick", "--examples", "^(dqn_cartpole|vae_digits)$"]
    for _ in range(2):  # the second run replaces the section it wrote
        out = subprocess.run(
            [sys.executable, "benchmarks/gpu_check.py", *args, "--write-readme", str(readme)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nearlier tables\n")
    assert text.count("## GPU check") == 1
    assert "| dqn_cartpole.yaml | dqn | FINISHED |" in text
    assert "| vae_digits.yaml | vae | FINISHED |" in text
    for workload in ("DQN CartPole", "DQN Pong", "VAE conv", "DCGAN", "RBM CD-1", "Value iter"):
        assert f"| {workload}" in text, workload
    assert "| bf16-mixed |" in text
