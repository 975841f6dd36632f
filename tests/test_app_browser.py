"""The app end to end in a real browser (Debian's Chromium driven by Playwright): open `moetune ui`, pick the
demo preset, see the epochs / steps choice, preview the dataset, see GPUs = 0 and a missing data file refused
beside their fields before any run folder exists, train, watch the progress bar and the loss plot advance, train
a second run and find its name in Evaluate / Chat / Export, export it (the summary card), open the first run in
Chat from the runs table and chat with both models, and evaluate it above the base model. Screenshots go to the
test's tmp folder (`screenshots/`, or $MOETUNE_SHOTS), and their path is printed.

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
              pytest.mark.timeout(3600)]  # minutes on a quiet machine; far more on a shared, loaded one


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
    env = dict(os.environ, MOETUNE_RUNS=str(tmp_path / "runs"), GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p]))  # this checkout's app, wherever moetune is installed
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


def _text(page, selector: str) -> str:
    """The text of an element, '' when it is not on the page."""
    loc = page.locator(selector)
    return loc.first.inner_text() if loc.count() else ""


def _tab(page, name: str) -> None:
    page.locator(f"button[role=tab]:has-text('{name}')").first.click()


def _pick(page, selector: str, option: str) -> None:
    """Choose an option of a Gradio Dropdown by its label text."""
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option).first.click()


def _type_value(page, selector: str, value: str) -> None:
    """Type a custom value into a Gradio Dropdown that allows one."""
    box = page.locator(f"{selector} input")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_demo_train_then_evaluate_in_the_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("MOETUNE_SHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    runs = tmp_path / "runs"
    # an earlier run whose events.jsonl has a garbled middle line: the page still loads and shows it, with a warning
    garbled = runs / "garbled"
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
                  _text(page, "#run-error"), 30, shots)
        assert page.locator("#run-shown input").input_value() == "garbled"
        assert str(garbled / "events.jsonl") in _text(page, "#run-error")
        assert int(_attr(page, "#progress .mt-progress", "data-step")) == 2
        page.screenshot(path=str(shots / "01-opened.png"), full_page=True)

        # the demo preset fills every control; how long to train is one choice (epochs | steps), never both
        _pick(page, "#preset", DEMO_TITLE)
        _wait_for(page, "the demo preset", lambda: "demo" in page.locator("#cfg-model-path input").input_value(),
                  30, shots)
        assert "train.jsonl" in page.locator("#cfg-data-train input").input_value()
        unit = page.locator("#cfg-train-length-unit")
        assert unit.locator("input[value=epochs]").is_checked() and _textbox(page, "#cfg-train-length").input_value() == "2"
        assert page.locator("#cfg-train-max-steps").count() == 0 and page.locator("#cfg-train-epochs").count() == 0
        unit.get_by_text("steps", exact=True).click()  # the number becomes the preset's steps, labelled so
        _wait_for(page, "the steps choice", lambda: _textbox(page, "#cfg-train-length").input_value() == "100"
                  and "steps" in _text(page, "#cfg-train-length"), 30, shots)
        unit.get_by_text("epochs", exact=True).click()
        _wait_for(page, "the epochs choice", lambda: _textbox(page, "#cfg-train-length").input_value() == "2", 30, shots)
        _textbox(page, "#cfg-train-length").fill("0.4")  # a fraction of an epoch keeps the test short
        _textbox(page, "#cfg-train-length").press("Tab")

        # the dataset preview: the template applied to the first rows, token counts, what the cut-off drops
        page.locator("#preview-dataset").click()
        _wait_for(page, "the dataset preview", lambda: page.locator("#preview").count(), 90, shots)
        assert int(_attr(page, "#preview", "data-rows")) == 2000 and int(_attr(page, "#preview", "data-dropped")) == 0
        first = page.locator("#preview .preview-row").first
        assert first.get_attribute("data-row") == "1" and first.get_attribute("data-status") == "kept"
        assert "### Response:" in first.inner_text() and "What is 27 + 82?" in first.inner_text()
        assert page.locator("#preview .preview-row").count() == 5
        page.screenshot(path=str(shots / "02-preview.png"), full_page=True)

        # GPUs = 0 is refused beside the field before Start, and Start writes nothing
        _textbox(page, "#run-name").fill("zero-gpus")
        _textbox(page, "#gpus").fill("0")
        _textbox(page, "#gpus").press("Tab")
        _wait_for(page, "the GPUs message", lambda: "GPUs 0: give the number of GPUs" in _text(page, "#msg-gpus"),
                  30, shots)
        page.locator("#start").click()
        _wait_for(page, "the refusal", lambda: "not started" in _text(page, "#train-message"), 60, shots)
        assert not (runs / "zero-gpus").exists() and not page.locator(".toast-body").count()
        _textbox(page, "#gpus").fill("1")
        _textbox(page, "#gpus").press("Tab")
        _wait_for(page, "the GPUs message to go", lambda: not _text(page, "#msg-gpus").strip(), 30, shots)

        # a missing data file is refused beside the Dataset field, and no run folder is created
        missing = tmp_path / "missing.jsonl"
        _textbox(page, "#run-name").fill("bad-data")
        _type_value(page, "#cfg-data-train", str(missing))
        page.locator("#start").click()
        _wait_for(page, "the missing file's refusal", lambda: f"data.train: data file {str(missing)!r} does not exist"
                  in _text(page, "#msg-data") and page.locator("#msg-data").is_visible(), 60, shots)
        page.screenshot(path=str(shots / "03-refused.png"), full_page=False)
        assert not (runs / "bad-data").exists() and page.locator("#run-shown input").input_value() == "garbled"
        _pick(page, "#cfg-data-train", "Demo: two-digit addition")

        # a run name that is not one folder name is refused, and nothing is written outside the runs folder
        escape = runs / "../../tmp/x"
        _textbox(page, "#run-name").fill("../../tmp/x")
        page.locator("#start").click()
        _wait_for(page, "the run name's refusal", lambda: "is not a folder name" in _text(page, "#train-message"), 30, shots)
        assert not escape.exists() and page.locator("#run-shown input").input_value() == "garbled"

        # start, and see the run advance
        _textbox(page, "#run-name").fill("demo-run")
        page.locator("#start").click()
        _wait_for(page, "the new run to be shown", lambda: page.locator("#run-shown input").input_value() == "demo-run",
                  60, shots)
        assert not _text(page, "#msg-data").strip()  # the earlier refusal is gone
        _wait_for(page, "the run to start", lambda: _attr(page, "#progress .mt-progress", "data-status")
                  in ("running", "done"), 180, shots)
        first = int(_wait_for(page, "the first step", lambda: int(_attr(page, "#loss-chart", "data-points") or 0),
                              180, shots))
        first_step = int(_attr(page, "#progress .mt-progress", "data-step") or 0)
        page.screenshot(path=str(shots / "04-training.png"), full_page=False)
        _wait_for(page, "the loss plot to advance",
                  lambda: int(_attr(page, "#loss-chart", "data-points") or 0) > first, 120, shots)
        _wait_for(page, "the progress bar to advance",
                  lambda: int(_attr(page, "#progress .mt-progress", "data-step") or 0) > first_step, 120, shots)
        _wait_for(page, "the log tail", lambda: "$ " in _text(page, "#train-log") and page.locator("#train-log").is_visible(),
                  60, shots)
        assert int(_attr(page, "#expert-heatmap", "data-layers") or 0) > 0
        assert int(_attr(page, "#progress .mt-progress", "data-total")) == 50  # 0.4 epoch of 2,000 rows at 16: ⌈0.4 × 125⌉

        status = _wait_for(page, "the run to finish", lambda: (s := _attr(page, "#progress .mt-progress", "data-status"))
                           in ("done", "error", "crashed") and s, 1200, shots)
        page.screenshot(path=str(shots / "05-trained.png"), full_page=True)
        assert status == "done", _text(page, "#run-error")
        assert int(_attr(page, "#progress .mt-progress", "data-step")) == 50
        assert int(_attr(page, "#loss-chart", "data-points")) == 50
        train_s = time.time() - t0

        # a second run, for 12 steps: the number shown is the number trained
        unit.get_by_text("steps", exact=True).click()
        _wait_for(page, "the steps choice", lambda: "steps" in _text(page, "#cfg-train-length"), 30, shots)
        _textbox(page, "#cfg-train-length").fill("12")
        _textbox(page, "#cfg-train-length").press("Tab")
        _textbox(page, "#run-name").fill("second-run")
        page.locator("#start").click()
        _wait_for(page, "the second run", lambda: page.locator("#run-shown input").input_value() == "second-run", 60, shots)
        _wait_for(page, "the second run's 12 steps", lambda: _attr(page, "#progress .mt-progress", "data-total") == "12"
                  or ("second-run" in _text(page, "#run-stats")
                      and _attr(page, "#progress .mt-progress", "data-status") in ("error", "crashed")), 300, shots)
        _wait_for(page, "the second run to finish", lambda: _attr(page, "#progress .mt-progress", "data-status")
                  in ("done", "error", "crashed"), 900, shots)
        assert _attr(page, "#progress .mt-progress", "data-status") == "done", _text(page, "#run-error")
        assert int(_attr(page, "#progress .mt-progress", "data-total")) == 12

        # the run just trained is what Evaluate, Chat and Export offer, and each names it
        _tab(page, "Evaluate")
        _wait_for(page, "the second run in Evaluate", lambda: page.locator("#eval-run input").input_value() == "second-run",
                  30, shots)
        _tab(page, "Chat")
        _wait_for(page, "the second run in Chat", lambda: page.locator("#chat-run input").input_value() == "second-run"
                  and "Talking to second-run" in _text(page, "#chat-run-name"), 30, shots)
        page.locator("#chat-send").click()  # an empty prompt says so
        _wait_for(page, "the empty prompt's note", lambda: "the prompt is empty" in _text(page, "#chat-note"), 30, shots)
        _tab(page, "Export")
        _wait_for(page, "the second run in Export", lambda: page.locator("#export-run input").input_value() == "second-run",
                  30, shots)
        _textbox(page, "#export-out").fill("../../tmp/exp_escape")  # not one folder name inside the run
        page.locator("#export-start").click()
        _wait_for(page, "the export folder's refusal", lambda: "is not a folder name" in _text(page, "#export-result"),
                  30, shots)
        assert not (runs / "second-run" / "../../tmp/exp_escape").exists()
        _textbox(page, "#export-out").fill("")
        page.locator("#export-start").click()
        _wait_for(page, "the export card", lambda: page.locator("#export-card").count()
                  or (page.locator("#export-result .mt-error").count()
                      and "is not a folder name" not in _text(page, "#export-result")), 600, shots)
        page.screenshot(path=str(shots / "06-exported.png"), full_page=True)
        card = page.locator("#export-card")
        assert card.count(), _text(page, "#export-result")
        assert card.get_attribute("data-exact") == "true" and "second-run" in card.inner_text()
        assert "model.safetensors" in card.inner_text() and "from_pretrained" in card.inner_text()
        assert not page.locator("#export-json").get_attribute("open")  # the JSON is folded away
        assert (runs / "second-run" / "export-hf-f16" / "export_report.json").is_file()

        # the runs table: every run with its facts; open the first run in Chat and talk to both models
        _tab(page, "Runs")
        _wait_for(page, "the runs table", lambda: page.locator("#runs-table .runs-row").count() == 3, 30, shots)
        names = [r.get_attribute("data-run") for r in page.locator("#runs-table .runs-row").all()]
        assert names[:2] == ["second-run", "demo-run"] and "garbled" in names
        assert "embedded lora (inside) r8" in page.locator("#runs-table .runs-row").first.inner_text()
        page.screenshot(path=str(shots / "07-runs.png"), full_page=True)
        _pick(page, "#runs-pick", "demo-run")
        page.locator("#runs-open-chat").click()
        _wait_for(page, "demo-run in Chat", lambda: page.locator("#chat-run input").input_value() == "demo-run"
                  and "Talking to demo-run" in _text(page, "#chat-run-name"), 30, shots)
        page.locator("#chat-prompt textarea").fill("What is 47 + 38?")
        page.locator("#chat-send").click()
        _wait_for(page, "the pending reply", lambda: "What is 47 + 38?" in _text(page, "#chat-tuned"), 30, shots)
        _wait_for(page, "the replies", lambda: "The answer is" in _text(page, "#chat-tuned")
                  and len(_text(page, "#chat-base").strip().splitlines()) >= 2, 600, shots)
        page.screenshot(path=str(shots / "08-chat.png"), full_page=True)
        tuned_reply = _text(page, "#chat-tuned")
        assert tuned_reply.count("What is 47 + 38?") == 1 and "The answer is" in tuned_reply  # one turn, answered

        # evaluate the first run (opened from the runs table) against the base model on the demo's held-out set
        _tab(page, "Runs")
        _pick(page, "#runs-pick", "demo-run")
        page.locator("#runs-open-evaluate").click()
        _wait_for(page, "demo-run in Evaluate", lambda: page.locator("#eval-run input").input_value() == "demo-run"
                  and "eval.json" in _text(page, "#eval-benches"), 30, shots)
        page.locator("#eval-start").click()
        _wait_for(page, "the evaluation", lambda: page.locator("#eval-done").count()
                  or page.locator("#eval-status .mt-error").count(), 900, shots)
        page.screenshot(path=str(shots / "09-evaluated.png"), full_page=True)
        assert page.locator("#eval-done").count(), _text(page, "#eval-status")
        assert "Results of demo-run" in _text(page, "#eval-results-run")
        row = page.locator("#eval-table .eval-row").first
        base, tuned = float(row.get_attribute("data-base")), float(row.get_attribute("data-tuned"))
        print(f"demo accuracy: base {base:.3f} -> fine-tuned {tuned:.3f}; training {train_s:.0f}s, "
              f"whole test {time.time() - t0:.0f}s")
        assert tuned > base
        assert "%" in _text(page, "#eval-table") and page.locator("#eval-chart").count()
        browser.close()
