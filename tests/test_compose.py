"""docker-compose.yml and the Dockerfile agree with each other and with what we pin.

No Docker engine runs here, so the file's structure and consistency are what can be checked.
"""

from __future__ import annotations

import re
from importlib.metadata import version

import yaml

from .conftest import ROOT


def compose() -> dict:
    data: dict = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_dependencies() -> None:
    services = compose()["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "api"} <= set(services)
    api = services["api"]
    assert "rlgen serve" in api["command"] and "http://ray-head:8265" in api["command"]
    assert "RLGEN_API_TOKEN" in api["environment"]
    assert "healthcheck" in api and "/healthz" in " ".join(api["healthcheck"]["test"])
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
    assert "postgresql://" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert "--allowed-hosts" in services["mlflow"]["command"]
    assert "ray-head:6379" in services["ray-worker"]["command"]
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_ports_are_unique() -> None:
    published = [
        p.split(":")[0] for s in compose()["services"].values() for p in s.get("ports", [])
    ]
    assert len(published) == len(set(published))
    assert "8265" in published and "5000" in published


def test_one_image_with_the_pinned_versions() -> None:
    services = compose()["services"]
    images = {s.get("image") for n, s in services.items() if n != "postgres"}
    assert images == {"rlgen:0.1.0"}
    assert version("rlgen") == "0.1.0"
    dockerfile = (ROOT / "Dockerfile").read_text()
    pattern = r'"(ray|mlflow)(?:\[[^\]]*\])?==([0-9.]+)"'
    image_pins = dict(re.findall(pattern, dockerfile))
    project_pins = dict(re.findall(pattern, (ROOT / "pyproject.toml").read_text()))
    assert image_pins.keys() == {"ray", "mlflow"}
    # Every node and every submitting client run the same Ray and MLflow.
    assert image_pins == project_pins
    assert "python:3.11" in dockerfile
