"""The MLflow UI in a real browser: a tiny sweep, `mlflow server` on loopback, headless Chromium.

Screenshots land in test-output/ (git-ignored)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO

from lora_exp.sweep.command import cmd_sweep

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "test-output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(workdir):
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{workdir}/mlruns/mlflow.db",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not become healthy in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        yield b
        b.close()


def test_sweep_in_the_mlflow_ui(workdir, store, mlflow_server, browser):
    from mlflow.tracking import MlflowClient

    assert cmd_sweep(["sweep=tiny", "n_trials=4"]) == 0
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    runs = client.search_runs([exp.experiment_id])
    child = next(r for r in runs if r.data.tags.get("trial_state") == "COMPLETE")
    SHOTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    base = f"{mlflow_server}/#/experiments/{exp.experiment_id}"

    # The parent run with its nested trials.
    page.goto(f"{base}/runs")
    page.get_by_text("sweep-tiny").wait_for(timeout=30000)
    if page.locator("button[aria-label='Close']").count():  # the assistant side panel
        page.locator("button[aria-label='Close']").first.click()
    _expand_nested(page)
    for n in range(4):
        page.get_by_text(f"tiny-trial-{n}", exact=True).wait_for(timeout=30000)
    page.screenshot(path=str(SHOTS / "ui_sweep_runs.png"))

    # A trial's loss chart.
    page.goto(f"{base}/runs/{child.info.run_id}/model-metrics")
    page.get_by_text("eval_loss", exact=True).first.wait_for(timeout=30000)
    page.get_by_placeholder("Search metric charts").fill("loss")  # charts render lazily below the fold
    page.get_by_text("train_loss", exact=True).first.wait_for(timeout=30000)
    # Plotly draws each curve as a path.js-line; a loss curve of 30 points has many segments
    page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot path.js-line')]
        .some(p => (p.getAttribute('d') || '').split('L').length > 10)""", timeout=30000)
    assert page.locator(".js-plotly-plot").count() >= 2
    page.wait_for_timeout(2000)
    page.screenshot(path=str(SHOTS / "ui_trial_metrics.png"))

    # The generations table, base vs adapter side by side.
    page.goto(f"{base}/runs/{child.info.run_id}/artifacts/generations.json")
    page.get_by_text("adapter_output").first.wait_for(timeout=30000)
    body = page.inner_text("body")
    for column in ("prompt", "expected", "base_output", "adapter_output", "exact_match"):
        assert column in body
    assert "Q: How do transformers work?" in body
    page.screenshot(path=str(SHOTS / "ui_generations.png"))


def _expand_nested(page) -> None:
    """Click the parent's expander (the nested trials are collapsed by default)."""
    for selector in ("[aria-label='Expand']", "[data-testid='nested-runs-expander']", "button[aria-label*='xpand']",
                     "text=⊞", "[role='gridcell'] button"):
        loc = page.locator(selector)
        if loc.count():
            loc.first.click()
            page.wait_for_timeout(1500)
            if page.get_by_text("tiny-trial-0", exact=True).count():
                return
