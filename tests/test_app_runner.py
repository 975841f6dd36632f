"""The app's run follower: a run's state comes from its folder alone (events, app.json, train.log), so a
reopened page shows the same thing; one live process per run folder; errors surface with the log tail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from app import plots, train_tab
from app.runner import Runner


def _events(path, events):
    with open(path / "events.jsonl", "a") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


def _step(i, total=10, t=1000.0):
    return {"type": "step", "time": t + i, "step": i, "total_steps": total, "epoch": 0, "loss": 2.0 / i,
            "balance_loss": 0.0, "lr": 1e-3, "tokens_per_s": 500.0, "memory_gb": 0.3,
            "expert_usage": [[3, 1, 0, 4], [2, 2, 2, 2]]}


def test_state_is_folded_from_events_and_read_incrementally(tmp_path):
    runner = Runner(tmp_path)
    run = tmp_path / "r1"
    run.mkdir()
    _events(run, [{"type": "start", "time": 1000.0, "step": 0, "total_steps": 10, "device": "cpu"}]
            + [_step(i) for i in range(1, 5)])
    s = runner.state("r1")
    assert (s.status, s.step, s.total_steps) == ("crashed", 4, 10)  # no process, no terminal event
    assert sorted(s.history) == [1, 2, 3, 4] and s.loss == pytest.approx(0.5)
    assert s.eta_s == pytest.approx(6.0)  # one step a second, 6 to go
    assert "Resume" in s.error
    _events(run, [_step(i) for i in range(5, 11)] + [{"type": "done", "time": 1011.0, "final_loss": 0.2}])
    s = runner.state("r1")
    assert (s.status, s.step, len(s.history), s.final_loss) == ("done", 10, 10, 0.2)
    # a second Runner (a reopened app) sees exactly the same
    again = Runner(tmp_path).state("r1")
    assert (again.status, again.step, again.history) == (s.status, s.step, s.history)
    svg = plots.training_charts(s.history)
    assert 'id="loss-chart"' in svg and 'data-points="10"' in svg
    assert 'data-layers="2"' in plots.expert_heatmap(s.expert_usage)


def test_held_out_loss_and_offload_traffic_are_shown(tmp_path):
    run = tmp_path / "r2"
    run.mkdir()
    offload = {"hits": 3, "misses": 5, "prefetched": 2, "evictions": 1, "bytes_moved": 2_500_000}
    _events(run, [{"type": "start", "time": 1000.0, "step": 0, "total_steps": 4, "device": "cuda:0",
                   "examples": 1997, "dropped": 3}]
            + [{**_step(i), "offload": offload} for i in range(1, 5)]
            + [{"type": "eval", "time": 1002.5, "step": 2, "eval_loss": 0.9},
               {"type": "eval", "time": 1004.5, "step": 4, "eval_loss": 0.7},
               {"type": "eval", "time": 1005.0, "step": 4, "benchmark": "gsm8k", "accuracy": 0.25, "rows": 8},
               {"type": "eval", "time": 1005.5, "step": 4, "benchmark": "boolq", "error": "no test file"}])
    s = Runner(tmp_path).state("r2")
    assert s.eval_loss == {2: 0.9, 4: 0.7} and s.offload == offload
    text = train_tab.status_markdown(s)
    assert "held-out loss 0.7000" in text and "2.5 MB/step (3 hits, 5 misses)" in text
    assert "gsm8k **25.0%**" in text and "boolq: not scored (no test file)" in text
    assert "3 rows dropped by the cut-off (data.max_len), training on 1,997" in text
    svg = plots.training_charts(s.history, s.eval_loss)
    assert svg.count('class="mt-marker"') == 2 and "held-out 0.7" in svg
    assert 'class="mt-legend"' in svg and 'class="mt-colour-scale"' in plots.expert_heatmap([[3, 1], [2, 2]])


def test_error_event_and_log_tail_are_shown(tmp_path):
    runner = Runner(tmp_path)
    run = tmp_path / "bad"
    run.mkdir()
    (run / "train.log").write_text("loading\rloading 50%\rloading 100%\nTraceback ...\nDataError: row 3 is bad\n")
    (run / "app.json").write_text(json.dumps({"pid": 0, "started": 1.0}))
    s = runner.state("bad")
    assert s.status == "error" and "row 3 is bad" in s.error and "loading 100%" in s.log_tail
    _events(run, [{"type": "error", "time": 2.0, "message": "model.path 'x' does not exist"}])
    s = runner.state("bad")
    assert s.status == "error" and s.error == "model.path 'x' does not exist"


def test_one_live_process_per_run_folder_and_stop(tmp_path, monkeypatch):
    """A live process owns its folder: starting again is refused; Stop sends it SIGTERM."""
    runner = Runner(tmp_path)
    run = tmp_path / "busy"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "app.json").write_text(json.dumps({"pid": sleeper.pid, "started": time.time()}))
        (run / "config.yaml").write_text("{}\n")
        assert Runner(tmp_path).state("busy").status == "starting"
        with pytest.raises(RuntimeError, match="already running"):
            runner.resume("busy")
        with pytest.raises(RuntimeError, match="already exists"):
            runner.start({}, "busy")
        assert runner.stop("busy")
        assert sleeper.wait(timeout=10) == -15
        assert runner.state("busy").status == "stopped"
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, 9)


def test_a_garbled_events_line_is_skipped_counted_and_shown(tmp_path):
    """A bad middle line of events.jsonl: the page still loads (the run is current), the other events are
    shown, the Train tab warns with the file and the count, and the sweep's reader counts the same."""
    import gradio as gr

    from app.controls import Controls
    from engine.sweep_results import run_result

    run = tmp_path / "garbled"
    run.mkdir()
    _events(run, [{"type": "start", "time": 1000.0, "step": 0, "total_steps": 4}, _step(1, 4), _step(2, 4)])
    with open(run / "events.jsonl", "ab") as f:
        f.write(b'{"type": "step", "step": 3, "lo\xff\x00ss": nan}}\n')  # garbled in the middle
    _events(run, [_step(3, 4), _step(4, 4), {"type": "done", "time": 1005.0, "final_loss": 0.5}])
    runner = Runner(tmp_path)
    with gr.Blocks():
        part = train_tab.build(runner, Controls())
    on_load, _, _ = part["load"]
    shown, _ = on_load()  # what every page load runs (it raised JSONDecodeError)
    assert shown["value"] == "garbled"
    s = runner.state("garbled")
    assert (s.status, s.step, sorted(s.history), s.final_loss, s.bad_lines) == ("done", 4, [1, 2, 3, 4], 0.5, 1)
    assert s.warning.startswith(f"{run / 'events.jsonl'}: 1 line is not a readable event and skipped")
    assert runner.state("garbled").bad_lines == 1  # read on from the offset: counted once
    _events(run, [{"type": "step", "time": 1006.0, "step": "four", "loss": 0.1}])  # JSON, but not an event
    assert runner.state("garbled").bad_lines == 2 and "2 lines are" in runner.state("garbled").warning
    (run / "summary.json").write_text("{}")
    result = run_result(run)  # the sweep reads the same file with the same reader
    assert (result["status"], result["step"], result["bad_lines"]) == ("done", 4, 2)
    assert str(run / "events.jsonl") in result["warning"]


def test_run_and_export_folders_are_one_name_inside_the_runs_folder(tmp_path, monkeypatch):
    """The run-name box and the export folder take one folder name; `../..`, an absolute path or `a/b` is
    refused with a message and nothing is written outside the runs folder (or the run)."""
    import gradio as gr

    from app import commands, export_tab

    root = tmp_path / "a" / "b" / "runs"
    root.mkdir(parents=True)
    runner = Runner(root)
    for bad in ("../../escape", str(tmp_path / "abs"), "a/b", "..", " "):
        with pytest.raises(ValueError, match="run name: .* is not a folder name"):
            runner.start({}, bad)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "runs"]

    run = root / "done-run"
    run.mkdir()
    (run / "adapter.safetensors").write_bytes(b"")
    exported = []
    monkeypatch.setattr(commands, "export", lambda run_dir, f, d, dest, **kw: exported.append(dest) or "{}")
    with gr.Blocks() as blocks:
        export_tab.build(runner)
    [do_export] = [b.fn for b in blocks.fns.values() if getattr(b.fn, "__name__", "") == "do_export"]
    for bad in ("../../tmp/exp_escape", str(tmp_path / "abs"), "x/../../y"):
        html = do_export("done-run", "hf", "f16", bad)
        assert "mt-error" in html and "Output folder" in html and "is not a folder name" in html, html
    assert exported == []
    do_export("done-run", "hf", "f16", "mine")
    do_export("done-run", "hf", "f16", "")
    assert exported == [run / "mine", run / "export-hf-f16"]
