"""Data-parallel training on the CPU (gloo, 2 ranks, real processes with torchrun's environment): 2 ranks at
micro-batch b equal 1 process at 2b (per-step losses, final adapters) for every strategy, with balance losses;
an expert routed on one rank only still leaves the replicas bit-identical; SIGTERM to the launcher stops both
ranks at one step with one checkpoint, and --resume continues exactly; a killed rank ends the job with a clear
error within the timeout; a different world size on resume is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.training import checkpoint as ckpt, collectives, distributed
from engine.config import from_dict
from engine.runs import read_events
from engine.data.synthetic import last_digit_rows
from engine.training import train

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STEPS = 4
RESUME_STEPS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(model: Path, data: Path, strategy: str = "embedded", placement: str = "parallel", *, micro_batch: int,
            steps: int = STEPS, grad_accum: int = 2, dropout: float = 0.0, balance: float = 0.0) -> dict:
    return {"model": {"path": str(model), "quant": "bf16"},
            "adapter": {"kind": "lora", "placement": placement, "rank": 4, "alpha": 8.0, "dropout": dropout},
            "routing": {"strategy": strategy, "num_adapters": 4, "top_k": 2, "balance_loss": balance,
                        "base_balance_loss": balance},
            "data": {"train": str(data), "template": "alpaca", "max_len": 128},
            "train": {"max_steps": steps, "lr": 1e-2, "warmup_steps": 0, "micro_batch": micro_batch,
                      "grad_accum": grad_accum, "seed": 0, "save_every": steps, "gradient_checkpointing": False}}


#: name -> (strategy, placement, balance-loss coefficient): every strategy the issue names
CASES = {"shared": ("shared", "parallel", 0.0), "routed": ("routed", "parallel", 0.02),
         "embedded-parallel": ("embedded", "parallel", 0.02), "embedded-inside": ("embedded", "inside", 0.0)}
#: the cases that also run with train.expert_parallel 2 (the experts and their adapters split over the ranks)
EP_CASES = ("embedded-parallel", "embedded-inside", "shared")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, port: int, timeout_s: float = 60) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), **{collectives.ENV_TIMEOUT: str(timeout_s)})
    return env


def _start_job(runs: list[dict], root: Path, timeout_s: float = 60) -> list[subprocess.Popen]:
    """Two ranks of tests/dist_worker.py on the job `runs`, as torchrun would start them."""
    job = root / f"job-{len(list(root.glob('job-*')))}.json"
    job.write_text(json.dumps(runs))
    port = _free_port()
    return [subprocess.Popen([PY, str(ROOT / "tests" / "dist_worker.py"), str(job)], env=_rank_env(r, port, timeout_s),
                             cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(2)]


def _wait(procs: list[subprocess.Popen], limit: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=limit)
        out.append((p.returncode, text))
    return out


def _failed(results: list[tuple[int, str]]) -> str:
    """Every rank's exit status and the end of its output, for an assertion message."""
    return "\n".join(f"rank {r}: exit {rc}\n{text[-3000:]}" for r, (rc, text) in enumerate(results))


def _losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run / "events.jsonl")[0] if e["type"] == "step"}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter.safetensors"))


def _wait_for(path: Path, what, limit: float = 120.0) -> list[dict]:
    end = time.time() + limit
    while time.time() < end:
        events = read_events(path)[0] if path.is_file() else []
        if any(what(e) for e in events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"no such event in {path} within {limit} s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("dist")
    data = root / "train.json"
    data.write_text(json.dumps(last_digit_rows(64, seed=1)))
    return {"root": root, "data": data, "model": tiny_checkpoint("qwen3_moe", layers=2, hidden=64, experts=4, top_k=2),
            # many experts, top-1, one sequence per rank: some experts get tokens on one rank only
            "skew_model": tiny_checkpoint("qwen3_moe", layers=2, hidden=64, experts=64, top_k=1)}


def _skew_config(setup, micro_batch: int) -> dict:
    cfg = _config(setup["skew_model"], setup["data"], micro_batch=micro_batch, grad_accum=1)
    return cfg


def _resume_config(setup) -> dict:
    """Dropout on (every rank's RNG matters), attention LoRA, one micro-batch a step."""
    cfg = _config(setup["model"], setup["data"], micro_batch=2, steps=RESUME_STEPS, grad_accum=1, dropout=0.1)
    cfg["routing"]["attention_lora"] = True
    cfg["train"]["save_every"] = 100
    return cfg


def _ep(cfg: dict) -> dict:
    cfg["train"]["expert_parallel"] = 2
    return cfg


def _kill_config(setup) -> dict:
    return _config(setup["model"], setup["data"], micro_batch=2, steps=100_000, grad_accum=1)


@pytest.fixture(scope="module")
def two_ranks(setup):
    """One job of 2 ranks: every case at micro-batch 2 (data parallel, then expert parallel), the skewed run, an
    expert-parallel run stopped and resumed, the uninterrupted reference of the resume test, and last a long run
    whose rank 1 is killed. The single-process runs train here meanwhile."""
    root = setup["root"]
    cases = {n: _config(setup["model"], setup["data"], s, p, micro_batch=2, balance=b) for n, (s, p, b) in CASES.items()}
    cases.update({f"ep-{n}": _ep(_config(setup["model"], setup["data"], *CASES[n][:2], micro_batch=2,
                                         balance=CASES[n][2])) for n in EP_CASES})
    runs = [{"config": c, "out": str(root / f"dp-{n}")} for n, c in cases.items()]
    runs.append({"config": _skew_config(setup, 2), "out": str(root / "dp-skew")})
    ep_parts = cases["ep-embedded-inside"]
    runs += [{"config": ep_parts, "out": str(root / "dp-ep-parts"), "stop_after": 2},
             {"config": ep_parts, "out": str(root / "dp-ep-parts"), "resume": True}]
    runs.append({"config": _resume_config(setup), "out": str(root / "dp-whole")})
    runs.append({"config": _kill_config(setup), "out": str(root / "dp-killed")})
    t0 = time.time()
    procs = _start_job(runs, root, timeout_s=30)
    singles = {}
    for n, (s, p, b) in CASES.items():
        out = root / f"one-{n}"
        train(from_dict(_config(setup["model"], setup["data"], s, p, micro_batch=4, balance=b)), out, echo=False,
              device="cpu")
        singles[n] = singles[f"ep-{n}"] = out
    singles["skew"] = root / "one-skew"
    train(from_dict(_skew_config(setup, 4)), singles["skew"], echo=False, device="cpu")
    # the last run: kill rank 1 once it trains; rank 0 must end by itself, with an error, within the timeout
    killed = root / "dp-killed"
    try:
        _wait_for(killed / "events.jsonl", lambda e: e["type"] == "step", limit=300)
    except AssertionError:
        for p in procs:
            p.kill()
        raise AssertionError("the job never reached its last run:\n" + "".join(p.communicate()[0][-3000:]
                                                                             for p in procs))
    procs[1].kill()
    t_kill = time.time()
    text, _ = procs[0].communicate(timeout=120)
    exit_s = time.time() - t_kill
    procs[1].communicate()
    return {"dp": {n: root / f"dp-{n}" for n in [*cases, "skew", "whole", "ep-parts"]}, "one": singles,
            "killed": {"out": killed, "rc": procs[0].returncode, "seconds": exit_s, "log": text},
            "seconds": time.time() - t0}


def _assert_equivalent(dp: Path, one: Path) -> None:
    a, b = _losses(dp), _losses(one)
    assert sorted(a) == sorted(b) == list(range(1, len(b) + 1))
    for s in b:  # events round losses to 6 decimals
        assert a[s] == pytest.approx(b[s], abs=3e-6), (s, a[s], b[s])
    ta, tb = _adapter(dp), _adapter(one)
    assert set(ta) == set(tb)
    moved = 0
    for name in tb:
        # fp32 sums in another order; AdamW at lr 1e-2 turns a near-zero gradient's rounding into up to ~1e-4 on
        # a few elements, while a real difference (normalisation, a missed row) moves thousands by ~lr
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-3, atol=1e-4, msg=name)
        assert (ta[name] - tb[name]).abs().mean() < 1e-6, name
        moved += int((tb[name] != 0).any())
    assert moved, "the adapters never left their zero init"
    start = next(e for e in read_events(dp / "events.jsonl")[0] if e["type"] == "start")
    assert start["world_size"] == 2


def _assert_replicas_identical(dp: Path, replicated: set[str] | None = None) -> None:
    """Every rank's digest of the replicated adapters at the last checkpoint is that of the adapter rank 0
    saved (`replicated`: the names that are replicas; None: all)."""
    state = json.loads((ckpt.latest_checkpoint(dp) / ckpt.STATE_FILE).read_text())
    assert state["world_size"] == 2 and len(state["replica_sha256"]) == 2
    saved = {n: t for n, t in _adapter(dp).items() if replicated is None or n in replicated}
    assert state["replica_sha256"][0] == state["replica_sha256"][1] == distributed.adapter_digest(saved)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_at_micro_batch_b_equal_one_process_at_2b(two_ranks, case):
    _assert_equivalent(two_ranks["dp"][case], two_ranks["one"][case])
    _assert_replicas_identical(two_ranks["dp"][case])


@pytest.mark.parametrize("case", EP_CASES)
def test_expert_parallel_2_equals_one_process(two_ranks, case):
    """Experts split over the 2 ranks (tokens exchanged with all_to_all), each rank its own half of the data:
    the same losses and final adapter (gathered) as one process; the replicated adapters identical."""
    dp = two_ranks["dp"][f"ep-{case}"]
    _assert_equivalent(dp, two_ranks["one"][f"ep-{case}"])
    _assert_replicas_identical(dp, {n for n in _adapter(dp) if ".experts." not in n})  # experts' rows: sharded
    state = json.loads((ckpt.latest_checkpoint(dp) / ckpt.STATE_FILE).read_text())
    assert state["expert_parallel"] == 2


def test_expert_parallel_stop_and_resume_equals_the_uninterrupted_run(two_ranks):
    """Stopped after step 2 (each rank's optimizer state of its experts saved), resumed: equal to the run that
    never stopped, to the bit."""
    parts, whole = two_ranks["dp"]["ep-parts"], two_ranks["dp"]["ep-embedded-inside"]
    assert [e["type"] for e in read_events(parts / "events.jsonl")[0]].count("stopped") == 1
    tstate = torch.load(ckpt.checkpoint_dir(parts, 2) / "trainer.pt", weights_only=False)
    assert len(tstate["optimizer_ranks"]) == 2
    assert _losses(parts) == _losses(whole)
    for name, t in _adapter(whole).items():
        assert torch.equal(_adapter(parts)[name], t), name


def test_balance_losses_add_up_across_ranks(two_ranks):
    """The Switch f·P loss of 2 ranks (routing counts all-reduced) is the single process's, step by step."""
    for case in ("routed", "embedded-parallel"):
        events = {run: {e["step"]: e["balance_loss"] for e in read_events(run / "events.jsonl")[0] if e["type"] == "step"}
                  for run in (two_ranks["dp"][case], two_ranks["one"][case])}
        dp, one = events.values()
        assert all(v > 0.01 for v in one.values())
        assert dp == pytest.approx(one, abs=3e-6)


def _first_step_experts(setup, rank: int) -> tuple[set[int], set[int]]:
    """Experts of the first MoE layer that rank `rank`'s rows of the first step route to: from all its tokens
    (pads included: the MoE routes them too, and the sparse optimizer counts their rows), and from its real ones."""
    from transformers import AutoModelForCausalLM

    from engine.data import load_examples
    from engine.model import load_tokenizer
    from engine.training import Batches

    cfg = from_dict(_skew_config(setup, 2))
    tok = load_tokenizer(cfg.model.path)
    examples, _ = load_examples(cfg.data.train, tok, cfg.data.template, cfg.data.max_len)
    batches = distributed.RankBatches(Batches(examples, 2, cfg.train.seed, tok.pad_token_id),
                                      SimpleNamespace(rank=rank, world_size=2))
    batch = batches.tensors(batches.epoch(0)[0], "cpu")
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_router_logits=True).router_logits[0]
    top = logits.topk(1, dim=-1).indices.flatten()
    return set(top.tolist()), set(top[batch["attention_mask"].flatten() == 1].tolist())


def test_an_expert_routed_on_one_rank_only_is_stepped_on_both(setup, two_ranks):
    """Experts with tokens on one rank only: both replicas step them (the used rows are all-reduced), and the
    result is one process's."""
    (all0, _), (all1, _) = _first_step_experts(setup, 0), _first_step_experts(setup, 1)
    assert all0 ^ all1, "the skewed batch should route some expert on one rank only"
    _assert_equivalent(two_ranks["dp"]["skew"], two_ranks["one"]["skew"])
    _assert_replicas_identical(two_ranks["dp"]["skew"])


def test_rank_slices_are_the_single_process_rows_padded_alike(setup, tokenizer, tmp_path):
    """Rank r's micro-batch is the r-th part of the single process's batch at world x b, padded to the global
    batch's width: the MoE routes pad tokens too, so a rank padded to its own width would use other rows."""
    import random

    from engine.data import load_examples
    from engine.training import Batches

    rows, rnd = last_digit_rows(12, seed=1), random.Random(0)
    for r in rows:  # lengths far apart, so a global batch's parts have different longest rows
        r["instruction"] += " " + " ".join(str(rnd.randint(0, 99)) for _ in range(rnd.randint(0, 60)))
    (tmp_path / "varied.json").write_text(json.dumps(rows))
    examples, _ = load_examples(str(tmp_path / "varied.json"), tokenizer, "alpaca", 256)
    single = Batches(examples, 6, 0, tokenizer.pad_token_id)
    ranks = [distributed.RankBatches(Batches(examples, 3, 0, tokenizer.pad_token_id), SimpleNamespace(rank=r, world_size=2))
             for r in range(2)]
    assert ranks[0].epoch(1) == ranks[1].epoch(1) == [b for b in single.epoch(1) if len(b) >= 2]
    narrower = 0
    for idx in single.epoch(1):
        whole = single.tensors(idx, "cpu")
        parts = [r.tensors(idx, "cpu") for r in ranks]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        narrower += sum(int(p["attention_mask"].sum(1).max()) < whole["input_ids"].shape[1] for p in parts)
    assert narrower, "some rank's rows should be shorter than the global batch's longest"
    assert [distributed.shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]


def _moetune(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{collectives.ENV_TIMEOUT: "60"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen([PY, "-m", "engine.cli", *args], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_and_resume_is_exact(setup, two_ranks):
    """`moetune train --gpus 2` (torchrun, gloo): SIGTERM after the first step; one checkpoint, both ranks
    stopped after the same step; resumed by 2 ranks it ends equal to the uninterrupted 2-rank run."""
    root = setup["root"]
    cfg_file = root / "resume.yaml"
    cfg_file.write_text(json.dumps(_resume_config(setup)))
    out = root / "dp-parts"
    launcher = _moetune(["train", str(cfg_file), "--out", str(out), "--gpus", "2", "--set", "model.quant=bf16"])
    _wait_for(out / "events.jsonl", lambda e: e["type"] == "step")
    launcher.send_signal(signal.SIGTERM)
    text, _ = launcher.communicate(timeout=120)
    events = read_events(out / "events.jsonl")[0]
    stopped = [e for e in events if e["type"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "signal", text[-3000:]
    stop_step = stopped[0]["step"]
    assert 1 <= stop_step < RESUME_STEPS
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.checkpoint_dir(out, stop_step).name]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [stop_step]
    tstate = torch.load(ckpt.latest_checkpoint(out) / "trainer.pt", weights_only=False)
    assert len(tstate["rng_ranks"]) == 2 and not torch.equal(tstate["rng_ranks"][0]["torch"],
                                                             tstate["rng_ranks"][1]["torch"])
    # a different world size cannot resume it: one clear error naming both
    with pytest.raises(collectives.DistributedError, match="job of 2 rank.*this job has 1"):
        train(from_dict(_resume_config(setup)), out, resume=True, echo=False, device="cpu")
    results = _wait(_start_job([{"config": _resume_config(setup), "out": str(out), "resume": True}], root))
    assert all(rc == 0 for rc, _ in results), _failed(results)
    whole = two_ranks["dp"]["whole"]
    parts = _losses(out)
    assert parts == _losses(whole)  # every step, before and after the stop, to the printed digit
    for name, t in _adapter(whole).items():
        assert torch.equal(_adapter(out)[name], t), name


def test_a_killed_rank_ends_the_job_with_an_error_not_a_hang(two_ranks):
    """Rank 1 killed (SIGKILL) mid-training: rank 0 exits by itself with one clear error, within the timeout."""
    killed = two_ranks["killed"]
    assert killed["rc"] != 0 and killed["seconds"] < 45, killed
    error = [e for e in read_events(killed["out"] / "events.jsonl")[0] if e["type"] == "error"]
    assert error and error[-1]["kind"] == "DistributedError", killed["log"][-2000:]
    assert error[-1]["message"].startswith("rank 0 of 2:") and "another rank died or stopped answering" in \
        error[-1]["message"]
    assert not (killed["out"] / "summary.json").exists()


def test_gpus_flag_starts_torchrun_with_the_same_arguments_and_errors_are_one_line(setup, capsys, monkeypatch):
    from engine.cli import main

    started = {}

    def execve(exe, cmd, env):
        started.update(exe=exe, cmd=cmd, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(collectives.os, "execve", execve)
    cfg = setup["root"] / "cli.yaml"
    cfg.write_text(json.dumps(_config(setup["model"], setup["data"], micro_batch=2)))
    out = str(setup["root"] / "cli")
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--out", out, "--gpus", "2", "--resume", "--set", "train.lr=0.001"])
    assert started["cmd"] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "-m", "engine.cli", "train", str(cfg), "--set", "train.lr=0.001", "--out", out, "--resume"]
    assert str(ROOT) in started["env"]["PYTHONPATH"].split(os.pathsep)
    # a bad config is one error before anything starts
    assert main(["train", str(cfg), "--out", out, "--gpus", "2", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err

    assert main(["train", str(cfg), "--out", str(setup["root"] / "cli"), "--gpus", "0"]) == 2
    assert "--gpus 0: give the number of GPUs" in capsys.readouterr().err
    os.environ.update(WORLD_SIZE="4", LOCAL_WORLD_SIZE="2")
    try:
        assert main(["train", str(cfg), "--out", str(setup["root"] / "cli"), "--gpus", "3"]) == 2
    finally:
        del os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"]
    assert "the launcher started 2 ranks on this machine" in capsys.readouterr().err
    assert "cmd" in started and len(started) == 3  # no second launch


def test_app_starts_a_run_on_n_gpus_and_shows_the_world_size(tmp_path, monkeypatch):
    """The Train tab's GPUs field: the run is `moetune train ... --gpus 2`, its resume asks for the same number
    of ranks, and the run line shows the world size from the start event."""
    from app import runner as R, train_tab

    spawned = []
    monkeypatch.setattr(R, "spawn_logged", lambda path, cmd, log: spawned.append(cmd) or SimpleNamespace(pid=None, poll=lambda: 0, returncode=0))
    runner = R.Runner(tmp_path)
    runner.start({"title": "t"}, "two", gpus=2)
    runner.start({"title": "t"}, "one")
    assert spawned[0][-2:] == ["--gpus", "2"] and "--gpus" not in spawned[1]
    run = tmp_path / "two"
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"type": "start", "time": 1.0, "step": 0, "total_steps": 4, "device": "cpu",
                            "world_size": 2}) + "\n")
        f.write(json.dumps({"type": "stopped", "time": 2.0, "step": 1}) + "\n")
    (run / "config.yaml").write_text("{}")
    s = runner.state("two")
    assert s.world_size == 2 and "on cpu × 2 ranks" in train_tab.status_markdown(s)
    runner.resume("two")
    assert spawned[-1][-2:] == ["--gpus", "2"]
