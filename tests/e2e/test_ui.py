"""The MLflow UI in a real browser: a tiny sweep, `lora-exp ui` on loopback, headless Chromium.

Screenshots land in test-output/ (git-ignored)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_exp.sweep.command import cmd_sweep

from helpers import REPO

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "test-output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ui(workdir, port):
    """`lora-exp ui` over the workdir's store, and the link it prints to the latest sweep."""
    exe = Path(sys.executable).parent / "lora-exp"
    proc = subprocess.Popen([str(exe), "ui", "--port", str(port)], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, seen = time.time() + 120, []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("latest sweep"):
            return proc, line.split(": ", 1)[1].strip()
        if time.time() > deadline:
            break
    proc.kill()
    pytest.fail("lora-exp ui printed no link:\n" + "".join(seen))


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


def test_sweep_in_the_mlflow_ui(workdir, store, browser):
    """`lora-exp ui` serves the store and prints the link to the sweep's parent run in the
    Model-training view: the browser sees the trials' runs and the best model there, not the GenAI
    view; a trial's loss chart and the generations table render."""
    from mlflow.tracking import MlflowClient

    assert cmd_sweep(["sweep=tiny", "n_trials=4"]) == 0
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lora_exp.kind") == "sweep")
    child = next(r for r in runs if r.data.tags.get("trial_state") == "COMPLETE")
    port = _free_port()
    ui, link = _ui(workdir, port)
    try:
        assert link == (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
                        f"?workflowType=machine_learning")
        SHOTS.mkdir(exist_ok=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"

        # The link: the parent run in the Model-training view, its nested trials, the best model.
        page.goto(link)
        page.get_by_text("sweep-tiny").first.wait_for(timeout=30000)
        if page.locator("button[aria-label='Close']").count():  # the assistant side panel
            page.locator("button[aria-label='Close']").first.click()
        for n in range(4):
            page.get_by_text(f"tiny-trial-{n}", exact=True).first.wait_for(timeout=30000)
        page.get_by_text("tiny-best").first.wait_for(timeout=30000)  # Logged models: the best adapter
        body = page.inner_text("body")
        assert "Child runs" in body and "Detect issues" not in body, "not the GenAI view"
        page.screenshot(path=str(SHOTS / "ui_sweep_parent.png"))

        # The runs table with the trials nested under the parent.
        page.goto(f"{base}/runs?workflowType=machine_learning")
        page.get_by_text("sweep-tiny").first.wait_for(timeout=30000)
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

        # The parent's answers table: every prompt, the base model and the best trials side by side.
        best = client.get_run(parent.info.run_id).data.tags["best_trial_number"]
        page = browser.new_page(viewport={"width": 1600, "height": 1000})  # the view as the parent's link opens it
        page.goto(f"{base}/runs/{parent.info.run_id}/artifacts/answers.json?workflowType=machine_learning")
        page.get_by_text(f"trial {best} (eval_loss").first.wait_for(timeout=30000)
        if page.locator("button[aria-label='Close']").count():  # the assistant side panel
            page.locator("button[aria-label='Close']").first.click()
        body = page.inner_text("body")
        for column in ("prompt", "expected", "base"):
            assert column in body
        assert body.count("(eval_loss ") >= 3, "three completed trials, side by side"
        assert "Q: How do transformers work?" in body
        page.screenshot(path=str(SHOTS / "ui_answers.png"))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        assert ui.wait(timeout=30) is not None


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
