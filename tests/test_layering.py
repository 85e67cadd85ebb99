"""Architecture rules that keep the algorithms testable and the service safe."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

# Imports every module of the run context and the algorithm packages in a fresh interpreter
# (`pkgutil.walk_packages`) and lists the first that brought in a forbidden package.
WALK = """
import importlib, json, pkgutil, sys
FORBIDDEN = {"ray", "mlflow", "fastapi", "service"}
offenders = {}
for package in ("runctx", "agents", "generative"):
    importlib.import_module(package)
    paths = sys.modules[package].__path__
    names = [package] + [m.name for m in pkgutil.walk_packages(paths, package + ".")]
    for name in names:
        importlib.import_module(name)
        bad = FORBIDDEN & {m.split(".")[0] for m in sys.modules}
        if bad:
            offenders[name] = sorted(bad)
            break
print(json.dumps(offenders))
"""


def test_run_context_and_algorithms_import_neither_ray_mlflow_fastapi_nor_service() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WALK], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}


def test_the_layering_walk_would_catch_an_import(tmp_path: Path) -> None:
    # The same walk over a package one of whose modules imports the service flags that module.
    pkg = tmp_path / "agents_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "clean.py").write_text("import math\n")
    (pkg / "leaky.py").write_text("import service.tracking\n")
    code = WALK.replace('("runctx", "agents", "generative")', '("agents_probe",)')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    assert json.loads(result.stdout) == {"agents_probe.leaky": ["service"]}


def test_the_run_context_imports_no_algorithm() -> None:
    code = (
        "import sys, runctx; bad = {'agents', 'generative', 'service', 'gymnasium'} & "
        "{m.split('.')[0] for m in sys.modules}; sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr or result.stdout


# Private APIs of Ray, Ray Tune and MLflow: anything under `_private`, an underscore attribute or
# keyword of theirs, or a method of theirs replaced at run time. Every upgrade could break them.
PRIVATE = re.compile(
    r"(ray|mlflow|tune)\._private|\b(ray|mlflow|tune)(\.\w+)*\._[a-z]\w*|\b_system_config\b"
    r"|\b_temp_dir\b|\b(Node|Tuner|MlflowClient)\.\w+\s*=[^=]"
)


def private_api_uses(root: Path) -> list[str]:
    found = []
    for package in ("runctx", "service", "agents", "generative", "benchmarks"):
        for path in (root / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE.search(line.split("#")[0]):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_private_apis_of_ray_or_mlflow() -> None:
    assert private_api_uses(ROOT) == []


def test_the_private_api_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "x.py").write_text(
        "from ray._private.node import Node\n"
        "ray.init(_system_config={})\n"
        "Node.start_head_processes = lambda self: None\n"
        "tune.execution.class_cache._x = 1\n"
        "ok = ray.init(address='auto')  # ray._private in a comment is fine\n"
    )
    assert [f.split(":")[1] for f in private_api_uses(tmp_path)] == ["1", "2", "3", "4"]


def test_no_print_in_library_code() -> None:
    offenders = []
    for package in ("runctx", "agents", "generative", "service"):
        for path in (ROOT / package).rglob("*.py"):
            if path.parent.name == "cli":  # the command line writes to its terminal
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


def test_run_names_name_the_subject() -> None:
    from service.spec import spec_model
    from service.trial import run_name

    rl = spec_model("value_iteration").model_validate(
        {"name": "x", "algorithm": "value_iteration", "env": {"id": "rlgen/GridWorld-v0"}}
    )
    gen = spec_model("gan").model_validate({"name": "x", "algorithm": "gan"})
    assert run_name(rl, 3) == "value_iteration-GridWorld-v0-s3"
    assert run_name(gen, 0) == "gan-digits-s0"
