"""The trainer, end to end on a tiny checkpoint: it learns a generated task (loss down, held-out
exact match up), resumes exactly, leaves a loadable checkpoint when interrupted, reports bad input
clearly; `moetune eval` and `moetune chat` use what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.training import checkpoint as ckpt
from engine.cli import main
from engine.config import from_dict
from engine.runs import read_events
from engine.data.synthetic import last_digit_rows
from engine.runs import RunError
from engine.training import train

ROOT = Path(__file__).resolve().parents[1]


def _write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def _config(model: Path, data: Path, **train) -> dict:
    return {
        "model": {"path": str(model), "quant": "bf16"},
        "adapter": {"kind": "lora", "placement": "inside", "rank": 16, "alpha": 32.0, "dropout": 0.0},
        "routing": {"strategy": "embedded", "attention_lora": True},
        "data": {"train": str(data), "template": "alpaca", "max_len": 128},
        "train": {"max_steps": 300, "lr": 3e-3, "warmup_steps": 10, "micro_batch": 16, "seed": 0,
                  "save_every": 100, "gradient_checkpointing": False, **train},
    }


def _steps(run: Path) -> dict[int, float]:
    events, _ = read_events(run / "events.jsonl", 0)
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_checkpoint):
    """A tiny qwen3_moe, 1000 training rows and 50 held-out rows (no number shared with training)."""
    root = tmp_path_factory.mktemp("task")
    train_rows = last_digit_rows(1000, seed=1)
    seen = {r["instruction"] for r in train_rows}
    held = [r for r in last_digit_rows(400, seed=2) if r["instruction"] not in seen][:50]
    return {"model": tiny_checkpoint("qwen3_moe", layers=2, hidden=64, experts=4, top_k=2),
            "train": _write_json(root / "train.json", train_rows),
            "eval": _write_json(root / "lastdigit" / "test.json", held), "root": root}


@pytest.fixture(scope="module")
def trained(task):
    """One full training run (300 steps) of embedded LoRA + attention LoRA."""
    out = task["root"] / "run"
    cfg = _config(task["model"], task["train"])
    cfg["eval"] = {"benchmarks": [str(task["eval"]), str(task["root"] / "nowhere" / "test.json")], "batch_size": 50}
    summary = train(from_dict(cfg), out, echo=False)
    return out, summary


def test_training_drives_loss_down_and_held_out_accuracy_up(task, trained):
    from engine.evaluate import evaluate
    from engine.runs.finished import load_run

    out, summary = trained
    assert summary["status"] == "done" and summary["step"] == 300
    losses = _steps(out)
    first, last = sum(losses[s] for s in range(1, 11)) / 10, sum(losses[s] for s in range(291, 301)) / 10
    assert last < 0.25 * first, (first, last)
    accuracy = {}
    run = load_run(out, device="cpu")
    for base in (True, False):
        with run.peft.disabled() if base else contextlib.nullcontext():
            accuracy[base] = evaluate(run.model, run.tokenizer, task["eval"], batch_size=50, max_new_tokens=8).accuracy
    assert accuracy[False] >= 0.8 and accuracy[False] > accuracy[True] + 0.5, accuracy
    # eval.benchmarks ran after training: the same accuracy; a missing benchmark file is reported, not fatal
    assert summary["accuracy"] == {"lastdigit": pytest.approx(accuracy[False])}
    events, _ = read_events(out / "events.jsonl", 0)
    scored = [e for e in events if e["type"] == "eval"]
    assert scored[0]["benchmark"] == "lastdigit" and scored[0]["rows"] == 50
    assert "does not exist" in scored[1]["error"] and events[-1]["type"] == "done"
    for name in ("adapter.safetensors", "moetune.json", "config.yaml", "events.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / ".lock").exists()


def test_eval_command_scores_every_row_of_a_test_file_and_the_base_model(task, trained, capsys):
    out, _ = trained
    for extra in ([], ["--base"]):
        assert main(["eval", "--run", str(out), "--bench", str(task["eval"]), "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        [bench] = result["benchmarks"]
        assert bench["name"] == "lastdigit" and bench["rows"] == 50
        preds = (Path(result["predictions"]) / "lastdigit.predictions.jsonl").read_text().splitlines()
        assert len(preds) == 50 and all({"output", "extracted", "correct"} <= set(json.loads(p)) for p in preds)
        assert result["model"] == ("base" if extra else "adapter")
    tuned = json.loads((out / "eval" / "adapter" / "results.json").read_text())["average"]
    base = json.loads((out / "eval" / "base" / "results.json").read_text())["average"]
    assert tuned > base + 0.5
    # --with-base: both from one loaded model (the adapters switched off for the base), the same numbers
    assert main(["eval", "--run", str(out), "--bench", str(task["eval"]), "--json", "--with-base"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["average"] == tuned and both["base"]["average"] == base and both["base"]["model"] == "base"
    assert main(["eval", "--run", str(out), "--bench", str(task["eval"]), "--base", "--with-base"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_eval_command_on_a_real_llm_adapters_test_file(trained, tmp_path, capsys):
    from tests.conftest import LLM_ADAPTERS

    src = LLM_ADAPTERS / "boolq" / "test.json"
    if not src.is_file():
        pytest.skip("../shared/data/llm-adapters is not beside the checkout")
    rows = json.loads(src.read_text())[:12]
    f = _write_json(tmp_path / "boolq" / "test.json", rows)
    out, _ = trained
    assert main(["eval", "--run", str(out), "--bench", str(f), "--json"]) == 0
    [bench] = json.loads(capsys.readouterr().out)["benchmarks"]
    assert bench["name"] == "boolq" and bench["rows"] == 12 and 0 <= bench["correct"] <= 12


def test_chat_answers_with_the_adapter(trained, capsys):
    out, _ = trained
    assert main(["chat", "--run", str(out), "--prompt", "What is the last digit of 4817?",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "The answer is 7"


def test_one_chat_process_answers_as_adapter_and_base(trained, capsys):
    """The app's chat: one `moetune chat --serve` process keeps the model loaded and answers every message
    twice — the adapter's reply, and the base model's from the same weights with the adapters off, equal
    to what `moetune chat --base` answers on its own."""
    from app import commands

    out, _ = trained
    prompts = ["What is the last digit of 4817?", "What is the last digit of 1234?"]
    replies = [commands.chat_both(out, p) for p in prompts]
    server = commands.chat_server(out)
    assert server is commands.chat_server(out) and server.alive  # the same process answered both
    assert [t for _, t in replies] == ["The answer is 7", "The answer is 4"]
    for prompt, (base, _) in zip(prompts, replies):
        assert main(["chat", "--run", str(out), "--prompt", prompt, "--base"]) == 0
        assert capsys.readouterr().out.strip() == base
    server.close()
    assert not server.alive


def test_app_evaluates_several_benchmarks_in_one_process(task, trained, tmp_path):
    from app import commands

    out, _ = trained
    rows = json.loads(task["eval"].read_text())
    second = _write_json(tmp_path / "lastdigit-b" / "test.json", rows[:20])
    table = commands.evaluate_both(out, [str(task["eval"]), str(second)], None, True)
    assert [(r["benchmark"], r["n"]) for r in table] == [("lastdigit", 50), ("lastdigit-b", 20)]
    assert all(r["tuned"] >= 0.8 and r["tuned"] > r["base"] + 0.5 for r in table)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "lfm2_moe", "granitemoe", "granitemoehybrid"])
def test_resume_reproduces_the_uninterrupted_losses(task, tiny_checkpoint, tmp_path, family):
    # dropout > 0 so that resuming must also restore the RNG state; DeepSeek-V3: MLA attention LoRA, a dense first
    # layer, shared experts, and the balance loss of its sigmoid router on the base router, which trains; LFM2-MoE:
    # short-conv layers beside attention, a dense first layer, a sigmoid router whose expert bias chooses; Granite:
    # the hub's fused experts, μP multipliers, its top-k-softmax router trained with the balance loss (Granite-4.0-H:
    # with Mamba-2 layers and a shared MLP)
    model = task["model"] if family == "qwen3_moe" else tiny_checkpoint(family)
    cfg = _config(model, task["train"], max_steps=12, save_every=4)
    if family != "qwen3_moe":
        cfg["routing"].update(base_balance_loss=0.01, train_router=True)
    cfg["adapter"]["dropout"] = 0.1
    cfg["data"]["eval"] = str(task["eval"])  # held-out loss at every checkpoint, in both runs alike
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(from_dict(cfg), full, echo=False)
    stopped = train(from_dict(cfg), parts, echo=False, stop_after=6)
    assert stopped == {"status": "stopped", "step": 6, "out": str(parts)}
    with pytest.raises(RunError, match="--resume"):
        train(from_dict(cfg), parts, echo=False)
    # a crash after step 6 would have lost its last checkpoint: resume from step 4
    ckpt.latest_checkpoint(parts)
    import shutil

    shutil.rmtree(ckpt.latest_checkpoint(parts))
    assert ckpt.latest_checkpoint(parts).name.endswith("4")
    train(from_dict(cfg), parts, resume=True, echo=False)
    a, b = _steps(full), _steps(parts)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-7) for s in a), (a, b)
    evals = {}
    for run in (full, parts):
        events, _ = read_events(run / "events.jsonl", 0)
        evals[run] = {e["step"]: e["eval_loss"] for e in events if e["type"] == "eval"}
    assert sorted(evals[full]) == [4, 8, 12] and evals[full][12] < evals[full][4]
    assert all(evals[parts][s] == pytest.approx(evals[full][s], rel=1e-6) for s in (8, 12))
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "adapter.safetensors")), load_file(str(parts / "adapter.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sigint_saves_a_loadable_checkpoint_and_stops_cleanly(task, tmp_path):
    import yaml

    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(task["model"], task["train"], max_steps=10_000, save_every=10_000)))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", str(cfg_file), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 240
    while time.time() < deadline and len(_steps(out) if (out / "events.jsonl").exists() else {}) < 3:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0
    events, _ = read_events(out / "events.jsonl", 0)
    stopped = [e for e in events if e["type"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "signal"
    latest = ckpt.latest_checkpoint(out)
    tensors, tstate, state = ckpt.load_checkpoint(latest)
    assert state["step"] == stopped[0]["step"] >= 3 and tensors and "optimizer" in tstate
    assert not (out / ".lock").exists()


def test_bad_input_fails_with_a_clear_error_before_the_run_folder_exists(task, tmp_path, capsys):
    import yaml

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    cases = {"missing.json": "does not exist", "bad.jsonl": "line 2", }
    for name, expected in cases.items():
        cfg = _config(task["model"], tmp_path / name, max_steps=2)
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"run-{name}"
        assert main(["train", str(cfg_file), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and expected in err, err
        assert not out.exists()  # refused by the preflight before the run folder exists
    cfg = _config(task["model"], task["train"])
    cfg["model"]["path"] = str(tmp_path / "no-model")
    with pytest.raises(Exception, match="no-model"):
        train(from_dict(cfg), tmp_path / "run-nomodel", echo=False)


def _llama_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 100}))
    return path


def test_bad_model_folder_is_named_with_its_fix_and_no_traceback(task, tmp_path, capsys):
    """The model folder is checked before anything loads (a missing local folder is never taken for a hub id)."""
    import shutil

    import yaml

    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(task["model"] / "config.json", weightless / "config.json")
    cases = {tmp_path / "no-such-model": "does not exist", _llama_folder(tmp_path / "llama"):
             "model_type 'llama' is not supported; supported families: deepseek_v2, deepseek_v3, ernie4_5_moe",
             weightless: "holds no *.safetensors weights", tmp_path / "config.yaml": "is not a directory"}
    (tmp_path / "config.yaml").write_text("x: 1\n")
    for folder, expected in cases.items():
        cfg = _config(folder, task["train"], max_steps=2)
        cfg_file = tmp_path / f"{folder.name}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        assert main(["train", str(cfg_file), "--out", str(tmp_path / f"run-{folder.name}")]) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and expected in err, err
    # the console script, as a user runs it: one line, no Python traceback
    for folder in (tmp_path / "no-such-model", tmp_path / "llama"):
        run = subprocess.run([str(Path(sys.executable).parent / "moetune"), "train",
                              str(tmp_path / f"{folder.name}.yaml"), "--out", str(tmp_path / f"cli-{folder.name}")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr and str(folder) in run.stderr, run.stderr


def test_rows_whose_prompt_fills_the_cut_off_are_dropped_and_counted(task, tmp_path, capsys):
    """As LLaMA-Factory's cutoff_len: a few rows too long to learn from are left out, the run starts, and the
    start event, the terminal and the app's run line count them."""
    from app import train_tab
    from app.runner import Runner

    rows = json.loads(task["train"].read_text())[:40]
    long = [{**rows[0], "instruction": "Spell this out: " + " ".join(["word"] * 200)}] * 3
    data = _write_json(tmp_path / "mixed.json", rows[:10] + long + rows[10:])
    out = tmp_path / "runs" / "mixed"
    train(from_dict(_config(task["model"], data, max_steps=2, micro_batch=4)), out, echo=True)
    start = next(e for e in read_events(out / "events.jsonl", 0)[0] if e["type"] == "start")
    assert (start["examples"], start["dropped"], start["data"]["dropped_long_prompt"]) == (40, 3, 3)
    assert "3 of 43 rows dropped by the cut-off data.max_len=128" in capsys.readouterr().err
    line = train_tab.status_markdown(Runner(tmp_path / "runs").state("mixed"))
    assert "3 rows dropped by the cut-off (data.max_len), training on 40" in line


def test_too_few_rows_left_or_a_cut_off_below_the_template_say_so(task, tmp_path):
    from engine.data import DataError

    rows = json.loads(task["train"].read_text())
    long = {**rows[0], "instruction": "Spell this out: " + " ".join(["word"] * 200)}
    data = _write_json(tmp_path / "few.json", rows[:3] + [long] * 5)
    with pytest.raises(DataError, match=r"3 of 8 rows left to train, and one optimizer step needs 8 "
                                        r"\(train.micro_batch × train.grad_accum\) \(5 rows' prompts fill"):
        train(from_dict(_config(task["model"], data, max_steps=2, micro_batch=4, grad_accum=2)), tmp_path / "a",
              echo=False)
    cfg = _config(task["model"], task["train"], max_steps=2)
    cfg["data"]["max_len"] = 64
    with pytest.raises(DataError, match=r"The 'alpaca' template alone is \d+ tokens with this model's tokenizer, "
                                        r"so no row fits under data.max_len=64"):
        train(from_dict(cfg), tmp_path / "b", echo=False)


def test_offloaded_layer_major_training_equals_resident_training(task, tmp_path):
    """memory.offload=on: experts behind a 3-slot cache, steps run layer by layer; same losses and adapter
    as the resident micro-batch loop, and the events count the experts copied."""
    cfg = _config(task["model"], task["train"], max_steps=4, micro_batch=4, grad_accum=2)
    cfg["model"]["quant"] = "nf4"
    resident, offloaded = tmp_path / "resident", tmp_path / "offloaded"
    train(from_dict(cfg), resident, echo=False)
    cfg["memory"] = {"offload": "on", "cache_slots": 3}
    train(from_dict(cfg), offloaded, echo=False)
    a, b = _steps(resident), _steps(offloaded)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a), (a, b)
    events, _ = read_events(offloaded / "events.jsonl", 0)
    moved = [e["offload"] for e in events if e["type"] == "step"]
    assert all(m["misses"] > 0 and m["bytes_moved"] > 0 for m in moved)
    from safetensors.torch import load_file

    wa, wb = load_file(str(resident / "adapter.safetensors")), load_file(str(offloaded / "adapter.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # loaded for eval / chat, the offloaded run serves its experts through the cache too, with equal logits
    from engine.model.offload import OffloadedExpertStore
    from engine.runs.finished import load_run

    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    runs = {name: load_run(path, device="cpu") for name, path in (("r", resident), ("o", offloaded))}
    assert all(isinstance(b.store, OffloadedExpertStore) for b in runs["o"].peft.banks.values())
    assert not any(isinstance(b.store, OffloadedExpertStore) for b in runs["r"].peft.banks.values())
    with torch.no_grad():
        torch.testing.assert_close(runs["o"].model(ids).logits, runs["r"].model(ids).logits, rtol=1e-4, atol=1e-4)


def test_qlora_style_training_with_nf4_attention_learns(task, tmp_path):
    """model.attention_quant=nf4: attention weights in bitsandbytes NF4 under the attention LoRA; the loss falls."""
    import bitsandbytes as bnb

    from engine.runs.finished import load_run

    cfg = _config(task["model"], task["train"], max_steps=40, save_every=40)
    cfg["model"].update(quant="nf4", attention_quant="nf4")
    out = tmp_path / "qlora"
    train(from_dict(cfg), out, echo=False)
    losses = _steps(out)
    assert sum(losses[s] for s in range(36, 41)) < 0.5 * sum(losses[s] for s in range(1, 6))
    run = load_run(out, device="cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules()) >= 8  # q/k/v/o of 2 layers


def test_a_line_torn_by_a_kill_is_dropped_before_appending(tmp_path):
    from engine.runs import EventLog

    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "start", "time": 1}\n{"type": "step", "ste')  # killed mid-write
    log = EventLog(path, echo=False)
    log.emit("start", step=0)
    log.close()
    events, _ = read_events(path, 0)
    assert [e["type"] for e in events] == ["start", "start"]


def test_held_out_scoring_mid_run_leaves_nf4_layers_trainable(task, tiny_checkpoint, tmp_path):
    """Scoring data.eval between steps must not put the model in eval mode: bitsandbytes repacks NF4
    linears for inference then (on the CPU), and they stop training (Qwen2-MoE's biased q/k/v raised)."""
    cfg = _config(tiny_checkpoint("qwen2_moe"), task["train"], max_steps=4, save_every=1, micro_batch=4)
    cfg["model"].update(quant="nf4", attention_quant="nf4")
    cfg["data"]["eval"] = str(task["eval"])
    summary = train(from_dict(cfg), tmp_path / "run", echo=False)
    events, _ = read_events(tmp_path / "run" / "events.jsonl", 0)
    assert summary["status"] == "done" and [e["step"] for e in events if e["type"] == "eval"] == [1, 2, 3, 4]


def test_expert_usage_is_summed_between_reports(task, tmp_path, monkeypatch):
    import engine.training.loop as T

    monkeypatch.setattr(T, "USAGE_REPORTS", 4)  # 12 steps -> a report every 3 steps (and the first, the last)
    train(from_dict(_config(task["model"], task["train"], max_steps=12, save_every=100)), tmp_path / "r", echo=False)
    events, _ = read_events(tmp_path / "r" / "events.jsonl", 0)
    usage = {e["step"]: e["expert_usage"] for e in events if e["type"] == "step" and "expert_usage" in e}
    assert sorted(usage) == [1, 3, 6, 9, 12]
    top_k, micro_batch = 2, 16
    routed = {}
    for step, layers in usage.items():
        per_layer = {sum(row) for row in layers}
        assert len(per_layer) == 1  # every token is routed top_k times in every layer
        routed[step] = per_layer.pop()
        assert routed[step] % (top_k * micro_batch) == 0  # whole padded micro-batches
    # the rows hold 100-120 tokens: one step routes fewer than two, two fewer than three
    assert routed[1] < routed[3] < min(routed[6], routed[9], routed[12])
