"""Walk the MLflow UI over freshly run example experiments in headless Chromium, saving
screenshots: what a new user sees when comparing runs.

    apt-get install chromium chromium-driver      # Debian's browser and its WebDriver
    pip install -e ".[ui]"                        # selenium
    python docs/ui_check.py [--out docs/ui] [--keep]

It runs `experiments/dqn_cartpole.yaml` (5 seeds, a small budget, so that some seeds stop early
at `stop_at_return` and others do not) and `experiments/dcgan_digits.yaml` (3 epochs) in-process
into a new SQLite store, serves it with `mlflow ui`, and saves: the experiments list, the DQN
runs table, its chart view, a child run, the parent run (its aggregates and seed curves), and
the GAN's chart view with its image card. Look at them before changing how runs are logged.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIEW = "workflowType=machine_learning"


def run_examples(uri: str) -> dict[str, str]:
    """Run the two examples; returns the ids the pages need."""
    from mlflow.tracking import MlflowClient

    from service.execution import launch
    from service.spec import load_spec

    dqn = load_spec(
        ROOT / "experiments" / "dqn_cartpole.yaml",
        ["params.total_timesteps=12000", "params.stop_at_return=200", "params.eval_every=1000"],
    )
    gan = load_spec(
        ROOT / "experiments" / "dcgan_digits.yaml",
        ["params.epochs=3", "seeds=[0]"],
    )
    dqn_result = launch(dqn, mode="local", tracking_uri=uri)
    gan_result = launch(gan, mode="local", tracking_uri=uri)
    client = MlflowClient(uri)
    return {
        "dqn_experiment": dqn_result.experiment_id,
        "dqn_parent": str(dqn_result.parent_run_id),
        "dqn_child": dqn_result.trials[0].run_id,
        "gan_experiment": gan_result.experiment_id,
        "gan_run": gan_result.trials[0].run_id,
        "gan_name": client.get_run(gan_result.trials[0].run_id).info.run_name,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_ui(uri: str, port: int) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def browser() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
    ):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=options)


def show(driver: object, view: str | None) -> None:
    """What a user clicks first: close the assistant panel, pick the runs' table or chart view
    (CHART_END: scrolled to its last section, the image cards), expand the parent runs (their
    trials are folded under them)."""
    from selenium.webdriver.common.by import By

    def click_all(css: str) -> None:
        for element in driver.find_elements(By.CSS_SELECTOR, css):  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                driver.execute_script("arguments[0].click();", element)  # type: ignore[attr-defined]

    click_all("button[data-component-id='mlflow.assistant.chat_panel.close']")
    if view is None:
        return
    click_all(f"input[name='runs-view-mode'][value='{view.removesuffix('_END')}']")
    time.sleep(2)  # the view's own list of runs
    click_all("button[data-component-id$='runnamecellrenderer.tsx_46']")  # a parent's expander
    if view.endswith("_END"):  # the last section of charts: the image cards
        time.sleep(2)
        driver.execute_script(SCROLL_TO_END)  # type: ignore[attr-defined]


# Scrolls every scrolled container of the page to its end.
SCROLL_TO_END = """
for (const el of document.querySelectorAll('*')) {
  const style = getComputedStyle(el).overflowY;
  if (el.scrollHeight > el.clientHeight + 50 && (style === 'auto' || style === 'scroll')) {
    el.scrollTop = el.scrollHeight;
  }
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    parser.add_argument("--wait", type=float, default=6.0, help="Seconds for a page to render.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        ids = run_examples(uri)
        with mlflow_ui(uri, free_port()) as ui:
            experiment = f"{ui}/#/experiments/{{}}?{VIEW}"
            run = f"{ui}/#/experiments/{{}}/runs/{{}}?{VIEW}"
            dqn, parent = ids["dqn_experiment"], ids["dqn_parent"]
            pages = [  # (screenshot, address, view of the runs: table or chart)
                ("1_experiments", f"{ui}/#/experiments?{VIEW}", None),
                ("2_runs_table", experiment.format(dqn), "TABLE"),
                ("3_chart_view", experiment.format(dqn), "CHART"),
                ("4_child_run", run.format(dqn, ids["dqn_child"]), None),
                ("5_parent_run", run.format(dqn, parent), None),
                (
                    "6_parent_curves",
                    f"{ui}/#/experiments/{dqn}/runs/{parent}/artifacts/figures/"
                    f"curves_eval_return_mean.png?{VIEW}",
                    None,
                ),
                ("7_gan_images", experiment.format(ids["gan_experiment"]), "CHART_END"),
            ]
            driver = browser()
            try:
                for name, url, view in pages:
                    driver.get(url)  # type: ignore[attr-defined]
                    time.sleep(args.wait)
                    show(driver, view)
                    time.sleep(args.wait / 2)
                    driver.save_screenshot(str(args.out / f"{name}.png"))  # type: ignore[attr-defined]
                    sys.stdout.write(f"{name}: {url}\n")
            finally:
                driver.quit()  # type: ignore[attr-defined]
    sys.stdout.write(f"screenshots in {args.out}\n")


if __name__ == "__main__":
    main()
