"""The app's run list and runs manager: sweep candidates are ordinary runs listed after their sweep, the focus run
is offered first, the table holds each run's facts, two runs compare by their config, a run is deleted."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from app import run_list, runs_tab
from app.runner import Runner


def _run(path, steps, loss, strategy="shared", rank=8, adapter=True, t=1000.0):
    path.mkdir(parents=True)
    events = [{"type": "start", "time": t, "step": 0, "total_steps": steps},
              {"type": "step", "time": t + 1, "step": steps, "total_steps": steps, "loss": loss, "lr": 1e-3},
              {"type": "eval", "time": t + 2, "step": steps, "benchmark": "eval.json", "accuracy": 0.93},
              {"type": "done", "time": t + 3, "final_loss": loss}]
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (path / "config.yaml").write_text(yaml.safe_dump({"adapter": {"kind": "lora", "rank": rank},
                                                      "routing": {"strategy": strategy}}))
    if adapter:
        (path / "adapter.safetensors").write_bytes(b"")


def test_sweep_candidates_are_listed_after_their_sweep_and_the_focus_comes_first(tmp_path):
    runner = Runner(tmp_path)
    _run(tmp_path / "old", 10, 0.5)
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text("{}")
    _run(tmp_path / "sw" / "shared", 4, 0.7)
    _run(tmp_path / "sw" / "routed", 4, 0.6, strategy="routed")
    _run(tmp_path / "new", 3, 0.9, adapter=False)
    now = time.time()
    for i, name in enumerate(["old", "sw/routed", "sw/shared", "new"]):  # newest last
        os.utime(tmp_path / name / "events.jsonl", (now + i, now + i))
    assert run_list.all_runs(runner) == ["new", "sw/routed", "sw/shared", "old"]
    assert run_list.finished(runner) == ["sw/routed", "sw/shared", "old"]
    assert runner.run_path("sw/shared") == tmp_path / "sw" / "shared"
    with pytest.raises(ValueError, match="run name"):
        runner.run_path("old/x")  # not a sweep: one folder name only
    assert run_list.label("sw/shared") == "sw › shared (sweep candidate)"
    names = run_list.finished(runner)
    assert run_list.pick(names, "old", "sw/shared") == "old"  # the focus first
    assert run_list.pick(names, "new", "sw/shared") == "sw/shared"  # focus unfinished: the tab's own choice
    assert run_list.pick(names, None, None) == "sw/routed"  # else the newest
    html = runs_tab.table_html(run_list.rows(runner))
    assert html.count("class='runs-row'") == 4 and "sweep sw</td>" in html
    assert "data-run='sw/routed'" in html and "routed lora r8" in html and "eval.json 93.0%" in html
    assert runner.state("sw/shared").name == "sw/shared"
    diff = runs_tab.compare_html(runner, "sw/shared", "sw/routed")
    assert "routing.strategy" in diff and "adapter.rank" not in diff and "0.7000" in diff
    runner.delete("sw/shared")
    assert not (tmp_path / "sw" / "shared").exists() and run_list.finished(runner) == ["sw/routed", "old"]
