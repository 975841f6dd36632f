"""`moetune sweep` on a tiny model: candidates at matched trainable parameters (within 10 %), the table
and sweep.json, reruns that skip finished candidates, Ctrl-C that stops cleanly and resumes, and a
--params no candidate can reach reported as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.config import ConfigError, from_dict
from engine.runs import read_events
from engine.sweep import count_trainable, expand, plan_sweep, run_sweep
from engine.data.synthetic import last_digit_rows
from engine.training import train

VENV_BIN = Path(sys.executable).parent
TRIES = ["routing.strategy=shared,embedded"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_checkpoint):
    """A base config on a tiny qwen3_moe with 64 training rows, 16 held-out rows, 4 steps a training."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "train.json").write_text(json.dumps(last_digit_rows(64, seed=1)))
    (root / "digit").mkdir()
    (root / "digit" / "test.json").write_text(json.dumps(last_digit_rows(16, seed=2)))
    # the benchmark: true/false answers (32 new tokens at most; a number's 256 would dominate the test's time)
    parity = [{"instruction": f"Is the last digit of {r['instruction'].split()[-1][:-1]} odd?", "input": "",
               "output": f"The answer is {str(int(r['answer']) % 2 == 1).lower()}",
               "answer": str(int(r["answer"]) % 2 == 1).lower()} for r in last_digit_rows(8, seed=3)]
    (root / "parity").mkdir()
    (root / "parity" / "test.json").write_text(json.dumps(parity))
    cfg = {"model": {"path": str(tiny_checkpoint("qwen3_moe")), "quant": "bf16"},
           "adapter": {"kind": "lora", "placement": "parallel", "rank": 4, "alpha": 8.0},
           "routing": {"strategy": "embedded"},
           "data": {"train": str(root / "train.json"), "eval": str(root / "digit" / "test.json"), "max_len": 128},
           "train": {"max_steps": 4, "lr": 3e-3, "micro_batch": 8, "save_every": 2, "gradient_checkpointing": False},
           "eval": {"benchmarks": [str(root / "parity" / "test.json")], "batch_size": 8}}
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_matches_parameters_scores_resumes_and_skips_finished_candidates(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    data = from_dict(yaml.safe_load(base.read_text())).to_dict()
    _, planned = plan_sweep(data, expand(TRIES))
    stopped = planned[0]  # as a Ctrl-C at step 2 leaves it: the sweep resumes it from its checkpoint
    train(from_dict(stopped["config"]), out / stopped["name"], stop_after=2, echo=False)
    assert main(["sweep", str(base), "--try", TRIES[0], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    target = count_trainable(from_dict(yaml.safe_load(base.read_text())))["trainable"]
    assert result["target_params"] == target and result["status"] == "done"
    by = {e["group"]: e for e in result["entries"]}
    assert set(by) == {"strategy=shared", "strategy=embedded"}
    for e in by.values():
        assert e["matched"] and abs(e["trainable"] - target) <= 0.1 * target, e
        # the run folder trained exactly that many parameters, at the chosen rank and alpha / rank of the base
        report = json.loads((out / e["name"] / "moetune.json").read_text())
        assert report["parameters"]["trainable"] == e["trainable"]
        assert report["config"]["adapter"]["rank"] == e["rank"] and e["alpha"] == 2.0 * e["rank"]
        r = e["result"]
        assert r["status"] == "done" and r["step"] == 4 and r["eval_loss"] > 0
        assert set(r["accuracy"]) == {"parity"} and 0 <= r["accuracy"]["parity"] <= 1
        assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0
    starts = [e for e in read_events(out / stopped["name"] / "events.jsonl")[0] if e["type"] == "start"]
    assert [(e["resumed"], e["step"]) for e in starts] == [(False, 0), (True, 2)]
    assert by["strategy=embedded"]["rank"] == 4  # the base config itself
    assert by["strategy=shared"]["rank"] == 16  # 1 adapter instead of the 4 experts' 4: rank x 4
    rows = {r["candidate"]: r for r in result["table"]}
    assert rows["strategy=shared"]["eval_loss"]["mean"] == by["strategy=shared"]["result"]["eval_loss"]
    assert result["winner"]["candidate"] in rows
    for name in rows:
        assert name in printed
    assert "held-out loss" in printed and "accuracy" in printed and "winner:" in printed

    # a rerun trains nothing: every candidate is finished
    before = {e["name"]: (out / e["name"] / "events.jsonl").stat().st_mtime_ns for e in result["entries"]}
    again = run_sweep(base, TRIES, out, echo=False)
    assert again["status"] == "done"
    assert {e["name"]: (out / e["name"] / "events.jsonl").stat().st_mtime_ns for e in again["entries"]} == before


def test_ctrl_c_stops_the_sweep_cleanly(base, tmp_path):
    out = tmp_path / "sweep"
    args = [str(VENV_BIN / "moetune"), "sweep", str(base), "--try", "routing.strategy=shared", "--out", str(out),
            "--max-steps", "100000", "--set", "train.save_every=100000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = out / "strategy-shared" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "step" for e in read_events(events)[0]):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # the sweep passes it on: the training saves a checkpoint and stops
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    result = json.loads((out / "sweep.json").read_text())
    [entry] = result["entries"]
    assert result["status"] == "stopped" and entry["result"]["status"] == "stopped"
    assert 0 < entry["result"]["step"] < 100000 and (out / entry["name"] / "checkpoints").is_dir()


def test_unreachable_params_are_reported(base):
    data = from_dict(yaml.safe_load(base.read_text())).to_dict()
    cands = expand(TRIES)
    with pytest.raises(ConfigError, match=r"--params 10: no candidate can be matched within 10%.*raise --params"):
        plan_sweep(data, cands, params=10)
    # a target one candidate reaches and the other cannot: the sweep runs, the miss is flagged with its reason
    shared_at_1 = count_trainable(from_dict({**data, "routing": {**data["routing"], "strategy": "shared"},
                                             "adapter": {**data["adapter"], "rank": 1}}))["trainable"]
    _, entries = plan_sweep(data, cands, params=shared_at_1)
    by = {e["group"]: e for e in entries}
    assert by["strategy=shared"]["matched"] and by["strategy=shared"]["rank"] == 1
    assert not by["strategy=embedded"]["matched"] and "even at rank 1" in by["strategy=embedded"]["note"]


def test_bad_try_names_the_fix():
    with pytest.raises(ConfigError, match="section.key=V1,V2"):
        expand(["routing.strategy"])
    with pytest.raises(ConfigError, match="not section.key"):
        expand(["strategy=shared,routed"])
    assert [c.name for c in expand(["adapter.kind=lora,gated"], ["r: routing.strategy=routed"], [0, 1])] == \
        ["r+kind-lora_seed-0", "r+kind-lora_seed-1", "r+kind-gated_seed-0", "r+kind-gated_seed-1"]


# ---- the app's Sweep tab ---------------------------------------------------------------------

def _fake_sweep(folder: Path, base_cfg: dict) -> dict:
    """A finished sweep folder as `moetune sweep` leaves it: sweep.yaml and sweep.json (two candidates)."""
    from engine.sweep_results import summarize, winner

    def entry(group, overrides, rank, acc, loss):
        return {"name": group, "group": group, "seed": None, "overrides": overrides, "rank": rank, "alpha": 2.0 * rank,
                "trainable": 4096, "percent": 2.9, "matched": True, "note": "",
                "result": {"status": "done", "step": 4, "total_steps": 4, "eval_loss": loss, "accuracy": {"digit": acc},
                           "tokens_per_s": 900.0, "memory_gb": 0.4, "final_loss": loss, "error": ""}}

    entries = [entry("strategy=shared", ["routing.strategy=shared"], 16, 0.25, 0.9),
               entry("strategy=routed", ["routing.strategy=routed", "routing.top_k=1"], 3, 0.5, 1.1)]
    result = {"target_params": 4096, "tolerance": 0.1, "status": "done", "entries": entries}
    result["table"] = summarize(entries)
    result["winner"] = winner(result["table"])
    folder.mkdir(parents=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(base_cfg))
    (folder / "sweep.json").write_text(json.dumps(result))
    return result


def test_app_sweep_tab_shows_the_table_and_fills_train_with_the_winner(base, tmp_path):
    from app import sweep_tab, train_tab
    from app.controls import Controls, make_widget
    from app.main import build_app

    assert build_app() is not None  # the app builds with its Sweep tab
    cfg = yaml.safe_load(base.read_text())
    sweeps = sweep_tab.Sweeps(tmp_path)
    result = _fake_sweep(tmp_path / "sw", cfg)
    assert sweeps.list() == ["sw"] and sweeps.status("sw") == ("done", "")
    assert result["winner"]["candidate"] == "strategy=routed"  # the higher accuracy, not the lower loss
    html = sweep_tab.table_html(result) + sweep_tab.chart_html(result)
    assert "data-candidate='strategy=shared'" in html and 'data-metric="accuracy"' in html and "50.0%" in html
    assert 'data-done="2" data-total="2"' in sweep_tab.progress_html(result, "done")

    winner = sweep_tab.winner_config(sweeps, "sw")  # the sweep's base with the winner's overrides, rank, alpha
    assert (winner["routing"]["strategy"], winner["routing"]["top_k"]) == ("routed", 1)
    assert (winner["adapter"]["rank"], winner["adapter"]["alpha"]) == (3, 6.0)
    assert winner["train"]["max_steps"] == cfg["train"]["max_steps"] and winner["train"]["seed"] == 0
    ctl = Controls()
    for fid in ("routing.strategy", "adapter.rank", "adapter.alpha", "routing.top_k"):
        ctl.add(fid, make_widget(fid))
    assert train_tab.form_updates(ctl, winner) == ["routed", 3, 6.0, 1]

    # a sweep run on the command line (no sweep.yaml): the config it ran, with its file's own steps
    (tmp_path / "cli").mkdir()
    ran = from_dict(cfg).to_dict()
    ran["train"]["max_steps"], ran["data"]["max_len"] = 2, 96  # as --max-steps 2 --set data.max_len=96 left it
    (tmp_path / "cli" / "sweep.json").write_text(json.dumps({**result, "config": str(base), "base": ran}))
    assert "cli" in sweeps.list()
    winner = sweep_tab.winner_config(sweeps, "cli")
    assert (winner["train"]["max_steps"], winner["data"]["max_len"], winner["adapter"]["rank"]) == (4, 96, 3)


def test_app_sweep_arguments_and_a_failed_start_are_reported(base, tmp_path):
    from app import sweep_tab

    args = sweep_tab.sweep_args("a: routing.strategy=shared\nb: routing.strategy=routed", "adapter.kind=lora,gated",
                                "0,1", "", 20)
    assert args == ["--candidate", "a: routing.strategy=shared", "--candidate", "b: routing.strategy=routed",
                    "--try", "adapter.kind=lora,gated", "--seeds", "0,1", "--max-steps", "20"]
    with pytest.raises(ConfigError, match="seeds"):
        sweep_tab.sweep_args("a: routing.strategy=shared", "", "zero", "", 20)
    with pytest.raises(ConfigError, match="at least two"):
        sweep_tab.sweep_args("a: routing.strategy=shared", "", "0", "", 20)
    # the app starts `moetune sweep` as a subprocess; an error it reports is shown with the log's line
    sweeps = sweep_tab.Sweeps(tmp_path)
    sweeps.start(yaml.safe_load(base.read_text()), "bad", ["--try", "routing.strategy=shared,dense", "--params", "10"])
    deadline = time.time() + 120
    while time.time() < deadline and sweeps.status("bad")[0] == "running":
        time.sleep(0.3)
    status, error = sweeps.status("bad")
    assert status == "error" and "--params 10" in error, (status, error)


# ---- placement per candidate -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_demo_sweep_over_strategies_adapts_inside_placement(tmp_path, monkeypatch):
    """The demo preset's `placement: inside` suits only embedded: the other strategies train parallel, and
    the table and sweep.json say so; the winner's overrides carry the placement it trained with."""
    from engine.config import apply_overrides, load
    from engine.sweep_results import run_result, summarize, table, winner_overrides

    monkeypatch.chdir(ROOT)  # the preset's paths are relative to the project root
    base = load("presets/demo.yaml").to_dict()
    assert base["adapter"]["placement"] == "inside"
    _, entries = plan_sweep(base, expand(["routing.strategy=shared,routed,embedded"]))
    by = {e["group"]: e for e in entries}
    for group in ("strategy=shared", "strategy=routed"):
        assert by[group]["config"]["adapter"]["placement"] == "parallel"
        assert by[group]["adapted"] == "placement parallel (inside needs embedded)"
        assert "adapter.placement=parallel" in by[group]["overrides"]
    assert by["strategy=embedded"]["config"]["adapter"]["placement"] == "inside" and not by["strategy=embedded"]["adapted"]
    for e in entries:
        e["result"] = {**run_result(tmp_path / e["name"]), "status": "done", "eval_loss": 1.0}
    by["strategy=shared"]["result"]["eval_loss"] = 0.5
    rows = summarize(entries)
    text = table({"table": rows, "winner": rows[0]})
    shared_line = next(ln for ln in text.splitlines() if ln.startswith("strategy=shared"))
    assert shared_line.endswith("placement parallel (inside needs embedded)")
    assert "placement" not in next(ln for ln in text.splitlines() if ln.startswith("strategy=embedded"))
    winner = from_dict(apply_overrides(base, winner_overrides({"winner": rows[0]})))
    assert (winner.routing.strategy, winner.adapter.placement) == ("shared", "parallel")


def test_a_placement_the_candidate_sets_that_cannot_apply_names_the_flag(tmp_path):
    """`--try adapter.placement=inside` crossed with a non-embedded strategy is the user's own choice: an
    error (one line, rc 2, no traceback) naming the --candidate that would work."""
    run = subprocess.run([str(VENV_BIN / "moetune"), "sweep", "presets/demo.yaml", "--try",
                          "routing.strategy=shared,embedded", "--try", "adapter.placement=inside", "--out",
                          str(tmp_path / "sw")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    [line] = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert line.startswith("moetune sweep: error: candidate strategy=shared,placement=inside: adapter.placement:")
    assert ("--candidate 'strategy-shared-placement-parallel: routing.strategy=shared adapter.placement=parallel'"
            in line), line
    assert not (tmp_path / "sw" / "strategy-shared-placement-inside").exists()  # nothing trained
