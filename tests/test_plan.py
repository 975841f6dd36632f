"""The memory planner on the real published configs: expert sizes as in DESIGN's table, OLMoE resident
on 24 GB, Mixtral only with offload, clear advice when a budget cannot work, exact closed forms for
adapter parameters, and `moetune plan --json` agreeing with plan()."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import yaml

from engine.model.arch import FAMILIES
from engine.model.arch.base import PUBLISHED_DIR
from engine.cli import main
from engine.config import from_dict
from engine.plan import GB, PCIE_BYTES_PER_S, plan
from engine.sizes import adapter_params, model_shape

#: DESIGN "Memory": experts in NF4 (GB) and one layer of experts (MB)
DESIGN_TABLE = {"olmoe": (3.3, 208), "qwen2_moe": (6.4, 268), "qwen3_moe": (15.0, 312), "mixtral": (23.3, 727),
                "gpt_oss": (9.9, 411), "ernie4_5_moe": (10.5, 389), "deepseek_v2": (7.4, 286),
                "deepseek_v3": (7.4, 286), "glm4_moe": (51.4, 1140), "qwen3_5_moe": (16.6, 415),
                "lfm2_moe": (4.0, 182), "granitemoe": (1.6, 49),
                "granitemoehybrid": (3.1, 78), "qwen3_next": (39.9, 831),
                "glm4_moe_lite": (14.3, 312), "gemma4": (11.8, 393)}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """family -> a folder holding only the flagship's published config.json (no weights)."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    for name, fam in FAMILIES.items():
        folder = root / name
        folder.mkdir()
        shutil.copy(PUBLISHED_DIR / f"{fam.published}.json", folder / "config.json")
        out[name] = folder
    return out


#: the host RAM the GPU-placement tests plan for: a workstation that holds Mixtral's offloaded experts (a machine
#: with less is refused: test_glm_4_5_air_trains_offloaded_only_where_host_ram_holds_its_experts)
HOST_GB = 64


def _cfg(path, **sections):
    return from_dict({"model": {"path": str(path)}, **sections})


@pytest.mark.parametrize("family", sorted(DESIGN_TABLE))
def test_expert_sizes_match_the_design_table(family, published):
    p = plan(_cfg(published[family]), gpu_gb=24)
    total_gb, layer_mb = DESIGN_TABLE[family]
    assert abs(p.experts_total_bytes / (total_gb * GB) - 1) < 0.05
    assert abs(p.expert_layer_bytes / (layer_mb * 1e6) - 1) < 0.05
    assert p.experts_total_bytes == p.expert_layer_bytes * len(p.placement)
    assert p.gpu_total <= p.budget_bytes or not p.fits


def test_olmoe_is_fully_resident_on_24gb(published):
    p = plan(_cfg(published["olmoe"]), gpu_gb=24)
    assert p.fits and set(p.placement.values()) == {"resident"} and len(p.placement) == 16
    assert p.pcie_bytes_per_step == 0 and p.cache_slots == 0 and p.host_pinned_bytes == 0
    assert p.gpu["experts"] == p.experts_total_bytes and p.gpu_total <= 24 * GB
    assert p.advice == []


def test_mixtral_fits_24gb_only_with_offload(published):
    p = plan(_cfg(published["mixtral"]), gpu_gb=24, host_gb=HOST_GB)
    offloaded, cached = p.layers("offloaded"), p.layers("cached")
    assert p.fits and offloaded and cached and not p.layers("resident")
    assert max(offloaded) < min(cached) == 32 - len(cached)  # the cache keeps the last layers for the backward
    assert p.experts_total_bytes + p.gpu_total - p.gpu["experts"] > 24 * GB  # everything resident cannot fit
    assert p.gpu_total <= 24 * GB and p.gpu["experts"] == p.cache_slots * p.expert_bytes
    assert p.cache_slots >= 8 * len(cached)
    assert p.pcie_bytes_per_step == 2 * len(offloaded) * p.expert_layer_bytes  # forward + backward
    assert p.pcie_seconds_per_step == pytest.approx(p.pcie_bytes_per_step / PCIE_BYTES_PER_S)
    # pinned: one arena a layer (engine.model.host_arena), its fields 16-byte aligned and whole pages: a few KB more
    assert p.experts_total_bytes <= p.host_pinned_bytes <= p.experts_total_bytes + 32 * (8 * 10 * 16 + 2 * 4096)
    # NF4 attention frees memory for more cached layers
    q = plan(_cfg(published["mixtral"], model={"path": str(published["mixtral"]), "attention_quant": "nf4"}),
             gpu_gb=24, host_gb=HOST_GB)
    assert len(q.layers("cached")) > len(cached)
    assert q.non_expert["attention"] == pytest.approx(p.non_expert["attention"] / 2 * 4.13 / 8, rel=0.01)


def test_mixtral_on_4gb_does_not_fit_and_says_what_to_change(published):
    p = plan(_cfg(published["mixtral"]), gpu_gb=4, host_gb=HOST_GB)
    assert not p.fits
    text = " ".join(p.advice)
    for field in ("memory.gpu_gb", "model.attention_quant", "train.micro_batch", "data.max_len", "adapter.rank"):
        assert field in text
    assert "DOES NOT FIT" in p.summary()
    need = float(p.advice[0].split("at least ")[1].split(" GB")[0])
    assert plan(_cfg(published["mixtral"]), gpu_gb=need + 0.01, host_gb=HOST_GB).fits  # the minimum it names: enough


def test_budget_too_small_for_a_streaming_cache_does_not_fit(published):
    ok = plan(_cfg(published["mixtral"]), gpu_gb=24, host_gb=HOST_GB)
    fixed = ok.gpu_total - ok.gpu["experts"]
    tight = plan(_cfg(published["mixtral"]), gpu_gb=(fixed + 1.5 * ok.expert_layer_bytes) / GB, host_gb=HOST_GB)
    assert not tight.fits  # one and a half layers of cache: no room to prefetch the next layer
    assert plan(_cfg(published["mixtral"]), gpu_gb=(fixed + 2.01 * ok.expert_layer_bytes) / GB, host_gb=HOST_GB).fits


# (family, config sections, expected trainable parameters by group), counted by hand
ADAPTER_CASES = [
    ("olmoe", {}, {"embedded": 16 * 64 * 8 * (2048 + 2048)}),
    ("olmoe", {"routing": {"strategy": "embedded", "train_router": True}},
     {"embedded": 33_554_432, "router": 16 * 64 * 2048}),
    ("mixtral", {"routing": {"strategy": "routed", "num_adapters": 4, "top_k": 2}},
     {"routed": 32 * (4 * 8 * 8192 + 4096 * 4)}),
    ("mixtral", {"adapter": {"kind": "bottleneck"},
                 "routing": {"strategy": "dense", "num_adapters": 4, "layers": "every:2"}},
     {"dense": 16 * 4 * 2 * 4096 * 8}),
    ("qwen2_moe", {"adapter": {"kind": "gated", "rank": 16}, "routing": {"strategy": "shared"}},
     {"shared": 24 * 3 * 2048 * 16}),
    ("qwen3_moe", {"adapter": {"placement": "inside"}, "routing": {"strategy": "embedded"}},
     {"embedded": 48 * 128 * 8 * ((2048 + 768) * 3)}),
    # attention LoRA: Qwen3 q 2048->4096 (32 heads x 128), k/v 2048->512 (4 kv heads), o 4096->2048
    ("qwen3_moe", {"routing": {"strategy": "none", "attention_lora": True}},
     {"attention": 48 * 8 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048))}),
    ("mixtral", {"routing": {"strategy": "shared", "attention_lora": True, "layers": [0, 31]}},
     {"shared": 2 * 8 * 8192, "attention": 2 * 8 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096))}),
    # MLA (DeepSeek-V2-Lite, all 27 layers): q_proj 2048->16x192, kv_a_proj_with_mqa 2048->512+64,
    # kv_b_proj 512->16x(128+128), o_proj 16x128->2048; the embedded experts of the 26 MoE layers
    ("deepseek_v2", {"routing": {"strategy": "embedded", "attention_lora": True}},
     {"embedded": 26 * 64 * 2 * 2048 * 8,
      "attention": 27 * 8 * ((2048 + 3072) + (2048 + 576) + (512 + 4096) + (2048 + 2048))}),
    # LFM2-8B-A1B: attention LoRA in its 6 attention layers only (q/out_proj 2048->2048, k/v 2048->8x64; the other
    # 18 are short convolutions), the embedded experts of its 22 MoE layers
    ("lfm2_moe", {"routing": {"strategy": "embedded", "attention_lora": True}},
     {"embedded": 22 * 32 * 2 * 2048 * 8, "attention": 6 * 8 * (2 * (2048 + 2048) + 2 * (2048 + 512))}),
    # Gemma 4 26B-A4B: 25 sliding layers (q 2816->16x256, k/v 2816->8x256, o) and 5 full ones (q 2816->16x512,
    # k 2816->2x512 doubling as v: no v_proj, o); the embedded experts of all 30 layers
    ("gemma4", {"routing": {"strategy": "embedded", "attention_lora": True}},
     {"embedded": 30 * 128 * 2 * 2816 * 8,
      "attention": 25 * 8 * (2 * (2816 + 4096) + 2 * (2816 + 2048)) + 5 * 8 * (2 * (2816 + 8192) + (2816 + 1024))}),
]


@pytest.mark.parametrize("family,sections,expected", ADAPTER_CASES)
def test_adapter_parameter_closed_forms(family, sections, expected):
    model_config = FAMILIES[family].published_config()
    assert adapter_params(from_dict(sections), model_shape(model_config)) == expected
    p = plan(from_dict(sections), model_config, gpu_gb=24)
    assert p.gpu["adapters"] == 4 * sum(expected.values()) and p.gpu["optimizer"] == 12 * sum(expected.values())


def test_inventory_counts_every_weight_and_the_shared_expert():
    for name, fam in FAMILIES.items():
        model_config = fam.published_config()
        shape = model_shape(model_config)
        facts = fam.facts(model_config)
        total = sum(shape.params.values()) + facts.expert_params
        published_b = {"olmoe": 6.92, "mixtral": 46.70, "qwen2_moe": 14.32, "qwen3_moe": 30.53, "gpt_oss": 20.91,
                       "ernie4_5_moe": 21.83,  # ERNIE ties its head to the embeddings: counted once
                       "deepseek_v2": 15.71, "deepseek_v3": 15.96, "glm4_moe": 106.85,
                       "qwen3_5_moe": 34.66,  # Qwen3.5: its language model (no vision tower)
                       "lfm2_moe": 8.34,  # LFM2-MoE ties its head to the embeddings: counted once
                       "granitemoe": 3.30,  # 6,597,577,728 bytes of bf16 tensors in the release
                       "granitemoehybrid": 6.94,
                       "qwen3_next": 79.67,
                       "glm4_moe_lite": 29.94,  # the model card's 80 B, less the MTP layer (not loaded)
                       "gemma4": 25.23,  # Gemma 4 26B-A4B: its language model (the card's 25.2B; no vision tower)
                       }[name]
        assert total / 1e9 == pytest.approx(published_b, abs=0.01)
    qwen = model_shape(FAMILIES["qwen2_moe"].published_config())
    assert qwen.params["shared_expert"] == 24 * 3 * 2048 * 5632  # non-routed: counted with the non-expert weights
    assert qwen.params["router"] == 24 * (60 + 1) * 2048  # the MoE router and the shared expert's gate


def test_activations_scale_with_tokens_and_checkpointing(published):
    path = published["olmoe"]
    four = plan(_cfg(path), gpu_gb=24).activations
    two = plan(_cfg(path, train={"micro_batch": 2}), gpu_gb=24).activations
    assert all(two[k] * 2 == four[k] for k in four)
    assert four["logits"] == 4 * 512 * 50304 * 10
    assert four["layer_inputs"] == 16 * 4 * 512 * 2048 * 2
    full = plan(_cfg(path, train={"gradient_checkpointing": False}), gpu_gb=24).activations
    assert sum(full.values()) > 4 * sum(four.values()) - 4 * four["logits"]


def test_plan_nf4_bytes_equal_a_quantised_store(tiny_checkpoint):
    from engine.model import quantize_checkpoint_experts

    path = tiny_checkpoint("qwen2_moe", layers=2, hidden=64, experts=4)
    p = plan(_cfg(path), gpu_gb=24)
    stores = quantize_checkpoint_experts(path)
    assert p.expert_layer_bytes == stores[0].nbytes()
    assert p.experts_total_bytes == sum(s.nbytes() for s in stores.values())


def test_cli_plan_json_agrees_with_plan(published, tmp_path, capsys):
    cfg_file = tmp_path / "mixtral.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"path": str(published["mixtral"])}, "train": {"micro_batch": 2}}))
    assert main(["plan", str(cfg_file), "--gpu-gb", "24", "--host-gb", str(HOST_GB), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(plan(_cfg(published["mixtral"], train={"micro_batch": 2}), gpu_gb=24,
                                          host_gb=HOST_GB).to_dict()))
    assert printed == expected and printed["fits"] and "offloaded" in printed["placement"].values()
    assert main(["plan", str(cfg_file), "--gpu-gb", "4"]) == 3  # does not fit
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "memory.gpu_gb" in out
    assert main(["plan", str(cfg_file), "--set", "model.path=/nonexistent/dir"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_a_preset_is_planned_before_its_model_is_downloaded(published, tmp_path):
    """A model folder that does not exist yet but is named after a family's flagship is planned from the
    published config (and says so); the plan equals the one of the real config.json."""
    missing = tmp_path / "models" / "Mixtral-8x7B-v0.1"
    ahead = plan(_cfg(missing), gpu_gb=24)
    real = plan(_cfg(published["mixtral"]), gpu_gb=24)
    assert ahead.model.startswith("Mixtral-8x7B-v0.1 (published config;") and "does not exist yet" in ahead.notes[0]
    assert (ahead.fits, ahead.cache_slots, ahead.experts_total_bytes) == (real.fits, real.cache_slots,
                                                                         real.experts_total_bytes)
    with pytest.raises(ValueError, match="does not exist"):
        plan(_cfg(tmp_path / "models" / "my-own-model"), gpu_gb=24)


# ---- several GPUs ------------------------------------------------------------------------------------------
#: the Mixtral recipe (presets/mixtral-*): routed LoRA, 8 adapters, top-2, one sequence of 256 a forward
MIXTRAL_RECIPE = {"routing": {"strategy": "routed", "num_adapters": 8, "top_k": 2},
                  "data": {"max_len": 256}, "train": {"micro_batch": 1, "grad_accum": 8}}


def _recipe(path, **train):
    return _cfg(path, routing=MIXTRAL_RECIPE["routing"], data=MIXTRAL_RECIPE["data"],
                train={**MIXTRAL_RECIPE["train"], **train})


def test_mixtral_fits_two_24gb_gpus_with_expert_parallel_and_no_offload(published):
    """DESIGN: 23.3 GB of NF4 experts cannot sit on one 24 GB card; split in two they do, everything resident."""
    one = plan(_recipe(published["mixtral"]), gpu_gb=24, gpus=2)  # data parallel: each GPU holds every expert
    assert one.layers("offloaded") and one.gpus == 2 and one.expert_parallel == 1
    assert any(a.startswith("train.expert_parallel: 2:") for a in one.advice), one.advice
    two = plan(_recipe(published["mixtral"], expert_parallel=2), gpu_gb=24, gpus=2)
    assert two.fits and set(two.placement.values()) == {"resident"} and two.pcie_bytes_per_step == 0
    assert two.experts_total_bytes == one.experts_total_bytes > 23 * GB
    tables = 4 * (16 + 256) * 32  # NF4 code tables, one copy a layer on each GPU
    assert two.experts_per_gpu_bytes - tables == (two.experts_total_bytes - tables) // 2
    assert two.gpu["experts"] == two.experts_per_gpu_bytes and two.gpu_total <= 24 * GB
    assert two.gpu["non_expert_weights"] == one.gpu["non_expert_weights"]  # replicated
    text = two.summary()
    assert "2 GPUs, figures per GPU; expert parallel 2: each GPU holds 4 of every layer's 8 experts" in text
    assert ": fits" in text and "PCIe per step: none" in text and not re.search(r"^\s+offloaded\s+layers", text, re.M)


def test_expert_parallel_shards_only_the_per_expert_adapters(published):
    routed = plan(_recipe(published["mixtral"], expert_parallel=2), gpu_gb=24)
    assert routed.gpu["adapters"] == sum(routed.trainable_params.values()) * 4  # routed adapters: replicated
    cfg = _cfg(published["mixtral"], routing={"strategy": "embedded", "attention_lora": True},
               train={"expert_parallel": 2})
    p = plan(cfg, gpu_gb=24)
    embedded, attention = p.trainable_params["embedded"], p.trainable_params["attention"]
    assert p.gpu["adapters"] == (embedded // 2 + attention) * 4 and p.gpu["optimizer"] == (embedded // 2 + attention) * 12


def test_all_to_all_estimate_is_the_routed_pairs_there_and_back(published):
    p = plan(_recipe(published["mixtral"], expert_parallel=2), gpu_gb=24)
    pairs = 1 * 256 * 8 * 2  # micro_batch × max_len × grad_accum tokens, top-2
    # bf16 rows of H = 4096 there and back, in the forward, backward and recompute, half of them leave the GPU
    assert p.all_to_all_bytes_per_step == 32 * 2 * pairs * 4096 * 2 * 3 // 2
    assert plan(_recipe(published["mixtral"]), gpu_gb=24, gpus=2).all_to_all_bytes_per_step == 0


def test_cli_plan_gpus(published, tmp_path, capsys):
    cfg_file = tmp_path / "mixtral.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"path": str(published["mixtral"])}, **MIXTRAL_RECIPE}))
    assert main(["plan", str(cfg_file), "--gpu-gb", "24", "--gpus", "2", "--set", "train.expert_parallel=2",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["gpus"], printed["expert_parallel"], printed["fits"]) == (2, 2, True)
    assert set(printed["placement"].values()) == {"resident"}
    assert main(["plan", str(cfg_file), "--gpu-gb", "24", "--gpus", "3", "--set", "train.expert_parallel=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("moetune plan: error: train.expert_parallel: 2 needs a job of exactly 2 ranks (this one has 3); "
                   "use --gpus 2, or set train.expert_parallel: 1 (data parallel only).")
    assert main(["plan", str(cfg_file), "--set", "train.expert_parallel=3"]) == 2
    assert "train.expert_parallel: 3 does not divide the model's 8 experts" in capsys.readouterr().err
    assert main(["plan", str(cfg_file), "--gpus", "0"]) == 2
    assert "--gpus: 0 must be at least 1" in capsys.readouterr().err


def test_glm_4_5_air_trains_offloaded_only_where_host_ram_holds_its_experts(published, capsys):
    """GLM-4.5-Air's 51.4 GB of NF4 experts stream from pinned host memory on a 24 GB card: the plan names the host
    RAM that needs (pinned experts + the layer being pinned + a reserve, ≈ 59 GB) and refuses, naming both figures
    and the fix, on a machine with less. Attention and the other linear layers in NF4 (14 GB in bf16)."""
    glm = {"path": str(published["glm4_moe"]), "attention_quant": "nf4"}
    p = plan(_cfg(glm["path"], model=glm), gpu_gb=24, host_gb=128)
    assert p.fits and p.layers("offloaded") and not p.layers("resident")
    # every layer is offloaded: what is pinned is the experts in their exact host arenas (records padded to 16 bytes,
    # each arena to whole pages; engine.sizes.host_layer_bytes), a hair over the experts themselves
    assert p.experts_total_bytes <= p.host_pinned_bytes <= p.experts_total_bytes * 1.0001
    assert 55 * GB < p.host_ram_needed_bytes < 66 * GB and p.host_ram_bytes == 128 * GB
    assert "host RAM: needs" in p.summary()
    short = plan(_cfg(glm["path"], model=glm), gpu_gb=24, host_gb=32)
    assert not short.fits and "NOT ENOUGH" in short.summary()
    assert "fits the GPU, but host RAM is short: DOES NOT FIT" in short.summary()  # the GPU part is not the problem
    need = short.host_ram_needed_bytes / GB
    assert short.advice[0].startswith("host RAM:") and f"{need:.2f} GB" in short.advice[0]
    assert "32.00 GB (--host-gb)" in short.advice[0] and f"at least {math.ceil(need)} GB of RAM" in short.advice[0]
    assert plan(_cfg(glm["path"], model=glm), gpu_gb=24, host_gb=need + 0.01).fits  # the figure it names is enough
    resident = plan(_cfg(published["olmoe"]), gpu_gb=24, host_gb=1)  # nothing offloaded: host RAM is not asked
    assert resident.fits and resident.host_ram_needed_bytes == 0
    cfg_file = published["glm4_moe"].parent / "glm.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": glm}))
    capsys.readouterr()
    assert main(["plan", str(cfg_file), "--gpu-gb", "24", "--host-gb", "32"]) == 3  # does not fit: host RAM
    assert "host RAM: the offloaded experts need" in capsys.readouterr().out
    assert main(["plan", str(cfg_file), "--gpu-gb", "24", "--host-gb", "128"]) == 0


def test_qwen3_next_trains_offloaded_with_the_host_ram_its_experts_need(published):
    """Qwen3-Next-80B-A3B's 39.9 GB of NF4 experts (512 × 48 layers) stream from pinned host memory on a 24 GB card,
    with attention in NF4; the plan names the host RAM (≈ 47 GB) and refuses a machine with less, naming it."""
    model = {"path": str(published["qwen3_next"]), "attention_quant": "nf4"}
    p = plan(_cfg(model["path"], model=model), gpu_gb=24, host_gb=HOST_GB)
    # no layer resident: most stream, the last few also keep a GPU copy (cached); host memory pins every layer
    assert p.fits and not p.layers("resident") and len(p.layers("offloaded")) >= 40
    assert len(p.layers("offloaded")) + len(p.layers("cached")) == 48
    assert p.experts_total_bytes <= p.host_pinned_bytes <= p.experts_total_bytes * 1.0001
    assert 35 * GB < p.host_ram_needed_bytes < HOST_GB * GB
    short = plan(_cfg(model["path"], model=model), gpu_gb=24, host_gb=32)
    assert not short.fits and short.advice[0].startswith("host RAM:")
    assert f"{short.host_ram_needed_bytes / GB:.2f} GB" in short.advice[0]


def test_gpt_oss_20b_fits_resident_and_120b_only_offloaded(published, tmp_path):
    """gpt-oss-20b (9.9 GB of NF4 experts) trains resident on 24 GB; gpt-oss-120b (59.2 GB) only with its experts
    in host memory, which the plan names."""
    p = plan(_cfg(published["gpt_oss"]), gpu_gb=24)
    assert p.fits and set(p.placement.values()) == {"resident"} and len(p.placement) == 24
    big = tmp_path / "gpt-oss-120b"
    big.mkdir()
    shutil.copy(PUBLISHED_DIR / "gpt-oss-120b.json", big / "config.json")
    p = plan(_cfg(big), gpu_gb=24)
    assert abs(p.experts_total_bytes / (59.2 * GB) - 1) < 0.05 and abs(p.expert_layer_bytes / 1.65e9 - 1) < 0.05
    assert "offloaded" in set(p.placement.values()) and p.host_pinned_bytes > 50 * GB
    # any published release plans before its download, not only a family's flagship
    ahead = plan(_cfg(tmp_path / "models" / "gpt-oss-120b"), gpu_gb=24)
    assert ahead.model.startswith("gpt-oss-120b (published config;")
    assert (ahead.experts_total_bytes, ahead.placement) == (p.experts_total_bytes, p.placement)
