"""A fair sweep: activated adapter parameters per token counted exactly for every strategy, ranks matched by either
count, and an lr grid that gives each candidate the lr with its lowest held-out loss before its seeds run."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.config import ConfigError, from_dict
from engine.runs import read_events
from engine.sweep import count_trainable, expand, lr_grid, plan_sweep, run_sweep
from engine.sweep_results import table, winner_overrides
from engine.data.synthetic import last_digit_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(path, strategy, placement="parallel", kind="lora", rank=4, **routing):
    return from_dict({"model": {"path": str(path), "quant": "bf16"},
                      "adapter": {"kind": kind, "placement": placement, "rank": rank, "alpha": 2 * rank},
                      "routing": {"strategy": strategy, "num_adapters": 5, "top_k": 3, **routing}})


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_activated_parameters_per_token_by_hand(family, tiny_checkpoint):
    path = tiny_checkpoint(family, layers=2, hidden=64, experts=4, top_k=2)
    config = json.loads((path / "config.json").read_text())
    H, L, E, k, r = 64, 2, 4, 2, 4
    I = config.get("moe_intermediate_size") or config["intermediate_size"]
    one = {"lora": r * 2 * H, "bottleneck": r * 2 * H, "gated": r * 3 * H}  # an H -> H adapter
    q = config["num_attention_heads"] * (config.get("head_dim") or H // config["num_attention_heads"])
    kv = config["num_key_value_heads"] * (config.get("head_dim") or H // config["num_attention_heads"])
    attention = L * r * ((H + q) + 2 * (H + kv) + (q + H))
    cases = {  # strategy, placement, kind, extra routing -> (activated, trainable) by hand
        ("shared", "parallel", "lora", ()): (L * one["lora"], L * one["lora"]),
        ("dense", "parallel", "gated", ()): (L * 5 * one["gated"], L * 5 * one["gated"]),
        # routed top-3 of 5: three adapters and the whole router (every logit is computed)
        ("routed", "parallel", "bottleneck", ()): (L * (3 * one["bottleneck"] + H * 5), L * (5 * one["bottleneck"] + H * 5)),
        # embedded: the adapters of the MoE's own top-2 experts
        ("embedded", "parallel", "lora", ()): (L * k * one["lora"], L * E * one["lora"]),
        ("embedded", "inside", "lora", ()): (L * k * 3 * r * (H + I), L * E * 3 * r * (H + I)),
        ("shared", "parallel", "lora", ("attention_lora",)): (L * one["lora"] + attention, L * one["lora"] + attention),
        ("none", "parallel", "lora", ("attention_lora",)): (attention, attention),
        ("embedded", "parallel", "lora", ("train_router",)): (L * (k * one["lora"] + E * H), L * (E * one["lora"] + E * H)),
    }
    for (strategy, placement, kind, extra), (activated, trainable) in cases.items():
        report = count_trainable(_cfg(path, strategy, placement, kind, **{x: True for x in extra}))
        assert (report["activated"], report["trainable"]) == (activated, trainable), (strategy, placement, kind, extra)


def test_match_by_activated_parameters(tiny_checkpoint):
    path = tiny_checkpoint("olmoe", layers=2, hidden=64, experts=4, top_k=2)
    base = _cfg(path, "embedded").to_dict()
    target = count_trainable(from_dict(base))["activated"]
    _, by_trainable = plan_sweep(base, expand(["routing.strategy=shared,embedded"]))
    target_t, by_activated = plan_sweep(base, expand(["routing.strategy=shared,embedded"]), match="activated")
    assert target_t == target
    ranks = {e["group"]: e["rank"] for e in by_activated}
    for e in by_activated:
        assert e["matched"] and abs(e["activated"] - target) <= 0.1 * target, e
    # embedded uses 2 of 4 experts' rank-4 adapters a token: shared matches it at rank 8 by activated parameters,
    # at rank 16 by trainable ones
    assert ranks == {"strategy=shared": 8, "strategy=embedded": 4}
    assert {e["group"]: e["rank"] for e in by_trainable}["strategy=shared"] == 16
    with pytest.raises(ConfigError, match="--match 'active'"):
        plan_sweep(base, expand(["routing.strategy=shared"]), match="active")


def test_lr_grid_arguments():
    assert lr_grid(["routing.strategy=shared,routed"], "1e-4, 3e-4") == ["1e-4", "3e-4"]
    assert lr_grid(["train.lr=1e-4,1e-3"]) == ["1e-4", "1e-3"]
    assert [c.group for c in expand(["train.lr=1e-4,1e-3", "routing.strategy=shared,routed"])] == \
        ["strategy=shared", "strategy=routed"]  # the lr grid is not a candidate of its own
    with pytest.raises(ConfigError, match="not both"):
        lr_grid(["train.lr=1e-4"], "1e-3")
    with pytest.raises(ConfigError, match="train.lr"):
        lr_grid([], "fast")
    with pytest.raises(ConfigError, match="listed twice"):
        lr_grid([], "1e-4,1e-4")


def test_the_lr_grid_picks_each_candidates_lowest_held_out_loss(tiny_checkpoint, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(last_digit_rows(32, seed=1)))
    (tmp_path / "eval.json").write_text(json.dumps(last_digit_rows(8, seed=2)))
    cfg = {"model": {"path": str(tiny_checkpoint("qwen3_moe")), "quant": "bf16"},
           "adapter": {"rank": 4, "alpha": 8}, "routing": {"strategy": "embedded"},
           "data": {"train": str(tmp_path / "train.json"), "eval": str(tmp_path / "eval.json"), "max_len": 128},
           "train": {"max_steps": 3, "lr": 1e-3, "micro_batch": 8, "save_every": 3, "gradient_checkpointing": False}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    no_eval = {**cfg, "data": {**cfg["data"], "eval": ""}}
    with pytest.raises(ConfigError, match="data.eval"):
        plan_sweep(from_dict(no_eval).to_dict(), expand(["routing.strategy=shared"]), grid=["1e-4"])
    result = run_sweep(tmp_path / "base.yaml", ["routing.strategy=shared,embedded"], out, grid="1e-5,3e-2",
                       seeds=[0, 1], echo=False)
    assert result["status"] == "done" and result["lr_grid"] == ["1e-5", "3e-2"]
    rows = {r["candidate"]: r for r in result["table"]}
    for group, row in rows.items():
        grid = [e for e in result["entries"] if e["group"] == group and e["role"] == "grid"]
        assert [e["seed"] for e in grid] == [0, 0] and len(grid) == 2  # at the group's first seed
        own = {e["lr"]: next(ev["eval_loss"] for ev in reversed(read_events(out / e["name"] / "events.jsonl")[0])
                             if ev["type"] == "eval") for e in grid}  # the runs' own held-out losses
        best = min(own, key=own.get)
        assert own["1e-5"] != own["3e-2"] and row["lr"] == best and row["lr_chosen"]
        assert {g["lr"]: g["eval_loss"] for g in row["grid"]} == own
        seeds = [e for e in result["entries"] if e["group"] == group and e["role"] == "seed"]
        assert [e["config"]["train"]["lr"] for e in seeds] == [float(best)] * 2
        # seed 0 at the chosen lr is the grid's run; seed 1 is trained at that lr
        assert seeds[0]["name"] == next(e["name"] for e in grid if e["lr"] == best)
        assert from_dict(yaml.safe_load((out / seeds[1]["name"] / "launch.yaml").read_text())).train.lr == float(best)
        assert row["done"] == row["runs"] == 2 and row["eval_loss"]["n"] == 2
    text = table(result)
    assert "lr grid, held-out loss: 1e-5:" in text and "(chosen)" in text and "activated" in text
    assert f"train.lr={result['winner']['lr']}" in winner_overrides(result)
    # a rerun trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/events.jsonl")}
    assert run_sweep(tmp_path / "base.yaml", ["routing.strategy=shared,embedded"], out, grid="1e-5,3e-2",
                     seeds=[0, 1], echo=False)["status"] == "done"
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/events.jsonl")} == before


def test_app_sweep_tab_has_the_lr_grid_match_and_activated_columns():
    from app import sweep_tab
    from engine.sweep_results import summarize

    args = sweep_tab.sweep_args("a: routing.strategy=shared\nb: routing.strategy=routed", "", "0", "", 20,
                                "1e-4,1e-3", "activated")
    assert args[-4:] == ["--lr-grid", "1e-4,1e-3", "--match", "activated"]
    with pytest.raises(ConfigError, match="--match"):
        sweep_tab.sweep_args("a: routing.strategy=shared\nb: routing.strategy=routed", "", "0", "", 20, "", "x")

    def run(name, role, lr, loss):
        return {"name": name, "group": "g", "seed": None, "role": role, "lr": lr, "overrides": [f"train.lr={lr}"],
                "rank": 4, "alpha": 8.0, "trainable": 4096, "activated": 2048, "percent": 2.0, "matched": True,
                "note": "", "result": {"status": "done", "eval_loss": loss, "accuracy": {}, "tokens_per_s": 10.0,
                                       "memory_gb": 0.1, "warning": ""}}

    entries = [run("g_lr-1e-4", "grid", "1e-4", 1.5), run("g_lr-1e-3", "grid", "1e-3", 1.2),
               run("g_lr-1e-3", "seed", "1e-3", 1.2)]
    result = {"target_params": 2048, "match": "activated", "tolerance": 0.1, "table": summarize(entries)}
    html = sweep_tab.table_html(result)
    assert "activated / token" in html and "2,048" in html and "0.001" in html
    assert "1e-4: 1.5000 · 1e-3: 1.2000 (chosen)" in html and "activated parameters" in html
