"""Architecture rules that keep the algorithms testable and the service safe."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import ROOT


def test_algorithms_do_not_import_ray_mlflow_or_fastapi() -> None:
    code = (
        "import sys, agents.value_iteration, agents.policy_iteration, agents.gridworld, generative;"
        "bad = {'ray', 'mlflow', 'fastapi'} & {m.split('.')[0] for m in sys.modules};"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr or result.stdout


def test_no_print_in_library_code() -> None:
    offenders = []
    for package in ("agents", "generative", "service"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders


def test_registry_is_a_closed_table_of_importable_entries() -> None:
    from pydantic import BaseModel

    from service.registry import ALGORITHMS

    for name, algo in ALGORITHMS.items():
        assert algo.name == name and callable(algo.train)
        assert issubclass(algo.config, BaseModel)
        assert algo.config.model_config.get("extra") == "forbid"
        for field, info in algo.config.model_fields.items():
            assert info.description, f"{name}.{field} has no description"


def test_metric_writer_helper_starts_without_torch() -> None:
    # The helper process starts for every trial longer than 0.5 s: torch would add ~0.8 s to it.
    code = "import sys, service.metric_writer; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, "service.metric_writer imports torch"


def test_run_names_name_the_subject() -> None:
    from service.spec import spec_model
    from service.trial import run_name

    rl = spec_model("value_iteration").model_validate(
        {"name": "x", "algorithm": "value_iteration", "env": {"id": "rlgen/GridWorld-v0"}}
    )
    gen = spec_model("gan").model_validate({"name": "x", "algorithm": "gan"})
    assert run_name(rl, 3) == "value_iteration-GridWorld-v0-s3"
    assert run_name(gen, 0) == "gan-digits-s0"
