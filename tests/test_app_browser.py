"""The app end to end in a real browser (Debian's Chromium driven by Playwright): open `moetune ui`,
pick the demo preset, start training, watch the progress bar and the loss plot advance, wait for the
end, evaluate, read an accuracy above the base model's, chat with both, and export the run. Screenshots go to the test's tmp folder
(`screenshots/`), and their path is printed.

Skipped only when /usr/bin/chromium is absent (`scripts/bootstrap.sh` installs it as root with apt).
Playwright never downloads a browser here: it launches the system Chromium.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
MOETUNE = Path(sys.executable).parent / "moetune"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
DEMO_TITLE = "Demo"

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                 "(scripts/bootstrap.sh installs it as root: apt-get install chromium)"),
              pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"`moetune ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"`moetune ui` did not answer on {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def app_url(tmp_path):
    """`moetune ui` on a free port, started from an unrelated folder, with its runs in tmp_path/runs."""
    port = _free_port()
    log = tmp_path / "ui.log"
    env = dict(os.environ, MOETUNE_RUNS=str(tmp_path / "runs"), GRADIO_ANALYTICS_ENABLED="False")
    cmd = [str(MOETUNE)] if MOETUNE.exists() else [sys.executable, "-m", "engine.cli"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd + ["ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _attr(page, selector: str, name: str) -> str | None:
    loc = page.locator(selector)
    return loc.first.get_attribute(name) if loc.count() else None


def _textbox(page, selector: str):
    """The text field of a Gradio Textbox (an input or a textarea, as its number of lines makes it)."""
    return page.locator(selector).locator("input, textarea").first


def _wait_for(page, what: str, check, timeout: float, shots: Path):
    """Poll `check()` until it returns a truthy value; on timeout, screenshot and fail with the run's errors."""
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        page.wait_for_timeout(500)
    page.screenshot(path=str(shots / f"timeout-{what.replace(' ', '-')}.png"), full_page=True)
    errors = page.locator("#run-error, #train-message, #eval-status").all_inner_texts()
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; the app shows: {errors}")


def test_demo_train_then_evaluate_in_the_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    # an earlier run whose events.jsonl has a garbled middle line: the page still loads and shows it, with a warning
    garbled = tmp_path / "runs" / "garbled"
    garbled.mkdir(parents=True, exist_ok=True)
    step = {"type": "step", "time": 2.0, "step": 1, "total_steps": 2, "epoch": 0, "loss": 1.5, "lr": 1e-3,
            "tokens_per_s": 100.0}
    (garbled / "events.jsonl").write_text("\n".join([json.dumps({"type": "start", "time": 1.0, "step": 0, "total_steps": 2}),
                                                     json.dumps(step), '{"type": "step", "st', json.dumps({**step, "step": 2}),
                                                     json.dumps({"type": "done", "time": 3.0, "final_loss": 1.0})]) + "\n")
    t0 = time.time()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app_url)
        page.wait_for_selector("#start")
        _wait_for(page, "the garbled run's warning", lambda: "1 line is not a readable event" in
                  page.locator("#run-error").inner_text(), 30, shots)
        assert page.locator("#run-shown input").input_value() == "garbled"
        assert str(garbled / "events.jsonl") in page.locator("#run-error").inner_text()
        assert int(_attr(page, "#progress .mt-progress", "data-step")) == 2
        page.screenshot(path=str(shots / "01-opened.png"), full_page=True)

        # the demo preset fills every control
        page.locator("#preset input").click()
        page.get_by_role("option", name=DEMO_TITLE).first.click()
        _wait_for(page, "the demo preset", lambda: "demo" in page.locator("#cfg-model-path input").input_value(),
                  30, shots)
        assert "train.jsonl" in page.locator("#cfg-data-train input").input_value()

        # a run name that is not one folder name is refused, and nothing is written outside the runs folder
        escape = tmp_path / "runs" / "../../tmp/x"
        _textbox(page, "#run-name").fill("../../tmp/x")
        page.locator("#start").click()
        _wait_for(page, "the run name's refusal", lambda: "is not a folder name" in
                  page.locator("#train-message").inner_text(), 30, shots)
        assert not escape.exists() and page.locator("#run-shown input").input_value() == "garbled"

        # start, and see the run advance
        _textbox(page, "#run-name").fill("demo-run")
        page.locator("#start").click()
        _wait_for(page, "the new run to be shown", lambda: page.locator("#run-shown input").input_value() == "demo-run",
                  60, shots)
        _wait_for(page, "the run to start", lambda: _attr(page, "#progress .mt-progress", "data-status")
                  in ("running", "done"), 180, shots)
        first = int(_wait_for(page, "the first step", lambda: int(_attr(page, "#loss-chart", "data-points") or 0),
                              180, shots))
        first_step = int(_attr(page, "#progress .mt-progress", "data-step") or 0)
        page.screenshot(path=str(shots / "02-training.png"), full_page=True)
        _wait_for(page, "the loss plot to advance",
                  lambda: int(_attr(page, "#loss-chart", "data-points") or 0) > first, 120, shots)
        _wait_for(page, "the progress bar to advance",
                  lambda: int(_attr(page, "#progress .mt-progress", "data-step") or 0) > first_step, 120, shots)
        assert int(_attr(page, "#expert-heatmap", "data-layers") or 0) > 0
        total = int(_attr(page, "#progress .mt-progress", "data-total") or 0)
        assert total > 0

        # the end
        status = _wait_for(page, "the run to finish", lambda: (s := _attr(page, "#progress .mt-progress", "data-status"))
                           in ("done", "error", "crashed") and s, 600, shots)
        page.screenshot(path=str(shots / "03-trained.png"), full_page=True)
        assert status == "done", page.locator("#run-error").inner_text()
        assert int(_attr(page, "#progress .mt-progress", "data-step")) == total
        assert int(_attr(page, "#loss-chart", "data-points")) == total
        train_s = time.time() - t0

        # evaluate the adapter against the base model on the demo's held-out set
        page.locator("#tab-evaluate-button, button[role=tab]:has-text('Evaluate')").first.click()
        _wait_for(page, "the finished run in the Evaluate tab",
                  lambda: page.locator("#eval-run input").input_value().strip(), 30, shots)
        _wait_for(page, "the run's benchmarks", lambda: "eval.json" in page.locator("#eval-benches").inner_text(),
                  30, shots)
        page.locator("#eval-start").click()
        _wait_for(page, "the evaluation", lambda: page.locator("#eval-done").count()
                  or page.locator("#eval-status .mt-error").count(), 300, shots)
        page.screenshot(path=str(shots / "04-evaluated.png"), full_page=True)
        assert page.locator("#eval-done").count(), page.locator("#eval-status").inner_text()
        row = page.locator("#eval-table .eval-row").first
        base, tuned = float(row.get_attribute("data-base")), float(row.get_attribute("data-tuned"))
        print(f"demo accuracy: base {base:.3f} -> fine-tuned {tuned:.3f}; training {train_s:.0f}s, "
              f"whole test {time.time() - t0:.0f}s")
        assert tuned > base
        assert "%" in page.locator("#eval-table").inner_text() and page.locator("#eval-chart").count()

        # chat: the base model and the adapted model answer side by side
        page.locator("#tab-chat-button, button[role=tab]:has-text('Chat')").first.click()
        _wait_for(page, "the finished run in the Chat tab",
                  lambda: page.locator("#chat-run input").input_value().strip(), 30, shots)
        page.locator("#chat-prompt textarea").fill("What is 47 + 38?")
        page.locator("#chat-send").click()
        _wait_for(page, "the replies", lambda: "The answer is" in page.locator("#chat-tuned").inner_text()
                  and len(page.locator("#chat-base").inner_text().strip().splitlines()) >= 2, 180, shots)
        page.screenshot(path=str(shots / "05-chat.png"), full_page=True)
        tuned_reply = page.locator("#chat-tuned").inner_text()
        assert tuned_reply.count("What is 47 + 38?") == 1 and "The answer is" in tuned_reply  # one turn, answered

        # export the run as a merged HF checkpoint (the tab's defaults) and read the exactness report
        page.locator("#tab-export-button, button[role=tab]:has-text('Export')").first.click()
        _wait_for(page, "the finished run in the Export tab",
                  lambda: page.locator("#export-run input").input_value().strip(), 30, shots)
        _textbox(page, "#export-out").fill("../../tmp/exp_escape")  # not one folder name inside the run
        page.locator("#export-start").click()
        _wait_for(page, "the export folder's refusal", lambda: "is not a folder name" in
                  page.locator("#export-result").inner_text(), 30, shots)
        assert not (tmp_path / "runs" / "demo-run" / "../../tmp/exp_escape").exists()
        _textbox(page, "#export-out").fill("")
        page.locator("#export-start").click()
        _wait_for(page, "the export", lambda: page.locator("#export-result .mt-msg").count()
                  and "is not a folder name" not in page.locator("#export-result").inner_text(), 300, shots)
        page.screenshot(path=str(shots / "06-exported.png"), full_page=True)
        result = page.locator("#export-result").inner_text()
        assert "Wrote" in result and '"exact": true' in result, result
        browser.close()
