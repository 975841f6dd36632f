"""Export of trained runs: merged HF checkpoints equal the unmerged model (base + adapters) to float
rounding on every family and every exact case; runs with no exact merge are refused with the reason and
the formats that do work; PEFT tensors applied by hand equal the merged weights; a merged (widened) model
runs in llama.cpp exactly as in transformers; every export writes export_report.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.model.arch import ExpertKey, get_family
from engine.config import from_dict
from engine.export import REPORT_FILE, ExportError, export_run
from engine.model import iter_tensors, load_model, read_config
from engine.adapters import attach, save_adapter

from .conftest import FAMILY_NAMES
from .tolerance import assert_close, assert_logits_close, bound, check_positions

RANK, ALPHA, N_ADAPTERS = 4, 8.0, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """Factory: the family's tiny checkpoint stored in bf16 like hub releases (so bf16-held experts are the
    checkpoint's own values), with optional config edits, and optionally 'sharp' (block weights rescaled
    to std 1/sqrt(fan_in), so that any mistake in the llama.cpp graph changes greedy tokens)."""
    from safetensors.torch import load_file, save_file

    cache: dict[tuple, Path] = {}

    def make(family: str, sharp: bool = False, **config) -> Path:
        key = (family, sharp, tuple(sorted(config.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp("base") / family
            shutil.copytree(tiny_checkpoint(family), dst)
            state = load_file(str(dst / "model.safetensors"))
            for name, w in state.items():
                if sharp and w.ndim == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight",
                                                                ".gate.weight", "e_score_correction_bias")):
                    w = w * (w.shape[1] ** -0.5 / w.std())
                state[name] = w.to(torch.bfloat16)
            save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
            raw = json.loads((dst / "config.json").read_text())
            raw.update(config)
            (dst / "config.json").write_text(json.dumps(raw))
            cache[key] = dst
        return cache[key]

    return make


def make_run(ckpt: Path, run_dir: Path, strategy: str, kind: str, placement: str = "parallel", quant: str = "bf16",
             attention_quant: str = "none", scale: float = 0.1, seed: int = 0, **routing):
    """Train nothing, but save a run whose every adapter tensor (zero-initialised ups too) is random and
    non-zero; returns the unmerged model (base + adapters, held as training holds them) it was saved from."""
    import bitsandbytes.functional as BF

    from engine.model import quantize_linear_layers

    loaded = load_model(ckpt, expert_quant=quant)
    if attention_quant == "nf4":  # as engine.runs.finished.load_run_model stores them, computing with their fp32
        for name in quantize_linear_layers(loaded.model, compute_dtype=torch.float32):  # dequantised values
            nf4 = loaded.model.get_submodule(name)
            plain = torch.nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(BF.dequantize_4bit(nf4.weight.data, nf4.weight.quant_state).float())
                if nf4.bias is not None:
                    plain.bias.copy_(nf4.bias)
            parent, _, child = name.rpartition(".")
            setattr(loaded.model.get_submodule(parent), child, plain)
    cfg = from_dict({"model": {"path": str(ckpt), "quant": quant, "attention_quant": attention_quant},
                     "adapter": {"kind": kind, "placement": placement, "rank": RANK, "alpha": ALPHA},
                     "routing": {"strategy": strategy, "num_adapters": N_ADAPTERS, **routing}})
    peft = attach(loaded, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    assert all(p.abs().min() > 0 for _, p in peft.trainable_parameters())
    save_adapter(peft, run_dir)
    return loaded.model.eval()


def ids_for(ckpt: Path, seed: int = 0) -> torch.Tensor:
    vocab = read_config(ckpt)[0].vocab_size
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def reload(path: Path):
    """An exported checkpoint as transformers itself loads it, in fp32, with its plain expert loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config._experts_implementation = "eager"
    return model.eval()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


# ---- exact merges ------------------------------------------------------------------------------------------

#: (family, strategy, kind, placement, routing extras, config edits, expected widening of the experts)
EXACT = [
    *[(f, "embedded", "lora", "inside", {"attention_lora": True}, {}, 0) for f in FAMILY_NAMES],
    *[(f, "embedded", "gated", "parallel", {}, {}, RANK) for f in FAMILY_NAMES],
    ("mixtral", "shared", "gated", "parallel", {"attention_lora": True}, {}, RANK),
    # dense on one layer only: the other layer's experts are padded with zero rows/columns
    ("qwen3_moe", "dense", "gated", "parallel", {"layers": [1]}, {}, N_ADAPTERS * RANK),
    # Qwen2-MoE with renormalised gates: shared adapters merge into the routed experts, not the shared one
    ("qwen2_moe", "shared", "gated", "parallel", {}, {"norm_topk_prob": True}, RANK),
    ("olmoe", "embedded", "gated", "parallel", {"train_router": True}, {}, RANK),
    # gpt-oss: gates from a softmax over the top-k logits sum to 1; the adapter widens the biased clamped-SwiGLU experts
    ("gpt_oss", "shared", "gated", "parallel", {"attention_lora": True}, {}, RANK),
    # Granite: softmax over the top-k logits, so dense adapters widen the hub's fused input/output_linear experts
    ("granitemoe", "dense", "gated", "parallel", {"attention_lora": True}, {}, N_ADAPTERS * RANK),
    # ERNIE: renormalised gates, so dense adapters widen the routed experts; its two ungated shared experts (sized
    # 2 × the experts' width) are padded with zero units to the new width; layer 2 only, after a dense layer 0
    ("ernie4_5_moe", "dense", "gated", "parallel", {"layers": [2], "attention_lora": True}, {}, N_ADAPTERS * RANK),
    # DeepSeek: shared / dense adapters merge into the ungated shared experts (n_shared_experts grows); V3's
    # gates sum to routed_scaling_factor, so the routed experts could not take them
    ("deepseek_v3", "shared", "gated", "parallel", {"attention_lora": True, "train_router": True}, {}, 0),
    ("deepseek_v2", "dense", "gated", "parallel", {"layers": [2]}, {}, 0),
    # LFM2-MoE: sigmoid scores renormalised (norm_topk_prob, × routed_scaling_factor 1), so dense adapters widen the
    # routed experts; layer 2 only (a short-conv layer: no attention to adapt), after a dense layer 0
    ("lfm2_moe", "dense", "gated", "parallel", {"layers": [2]}, {}, N_ADAPTERS * RANK),
    # Gemma 4: renormalised top-k gates, each then times the expert's per_expert_scale (not 1 in the tiny model):
    # each expert's copy of the dense adapters is divided by its scale; with attention LoRA (k = v in full layers)
    ("gemma4", "dense", "gated", "parallel", {"attention_lora": True, "train_router": True}, {}, N_ADAPTERS * RANK),
]


@pytest.mark.parametrize("family, strategy, kind, placement, routing, edits, widen", EXACT,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}{'-' + '-'.join(c[4]) if c[4] else ''}" for c in EXACT])
def test_hf_merge_equals_unmerged_model(checkpoint, tmp_path, family, strategy, kind, placement, routing, edits,
                                        widen):
    ckpt = checkpoint(family, **edits)
    unmerged = make_run(ckpt, tmp_path / "run", strategy, kind, placement, **routing)
    report = export_run(tmp_path / "run", "hf", "f32", tmp_path / "out")

    ids = ids_for(ckpt)
    want, got = logits(unmerged, ids), logits(reload(tmp_path / "out"), ids)
    base = logits(load_model(ckpt).model, ids)
    assert (want - base).abs().max() > 0.05  # the adapters change the model: the comparison is not vacuous
    assert_close(got, want)
    assert report["max_abs_logit_diff"] <= bound(report["check"]["max_abs_logit"]) and report["check"]["prompts"] == 3

    # same tensor names as the base checkpoint on disk, experts widened by the adapters' width
    fam = get_family(family)
    cfg = read_config(ckpt)[0]
    inter = fam.expert_intermediate_size(cfg)
    merged, orig = tensors(tmp_path / "out"), tensors(ckpt)
    assert sorted(merged) == sorted(orig)
    assert fam.expert_intermediate_size(read_config(tmp_path / "out")[0]) == inter + widen
    assert report["expert_intermediate_size"] == {"base": inter, "merged": inter + widen}
    merged = dict(fam.convert_stream(merged.items()))  # per-expert projections (gpt-oss's hub layout is fused)
    assert merged[fam.expert_key_name(ExpertKey(1, 0, "down"))].shape == (cfg.hidden_size, inter + widen)
    assert merged[fam.expert_key_name(ExpertKey(1, 0, "gate"))].shape == (inter + widen, cfg.hidden_size)
    if routing.get("layers") == [1]:  # layer 0 had no adapter: zero padding
        assert merged[fam.expert_key_name(ExpertKey(0, 2, "up"))][inter:].abs().max() == 0
        assert merged[fam.expert_key_name(ExpertKey(1, 2, "up"))][inter:].abs().min() > 0
    if family == "ernie4_5_moe" and widen:  # the shared experts: padded with zeros to 2 × the experts' new width
        shared = merged["model.layers.1.mlp.shared_experts.up_proj.weight"]
        assert shared.shape == (2 * (inter + widen), cfg.hidden_size) and shared[2 * inter:].abs().max() == 0
        assert merged["model.layers.2.mlp.shared_experts.down_proj.weight"][:, 2 * inter:].abs().max() == 0
    if routing.get("layers") == [2] and widen:  # layer 1 had no adapter: zero padding
        assert merged[fam.expert_key_name(ExpertKey(1, 2, "up"))][inter:].abs().max() == 0
        assert merged[fam.expert_key_name(ExpertKey(2, 2, "up"))][inter:].abs().min() > 0
    if routing.get("train_router"):
        first = fam.facts(cfg).moe_layers[0]
        trained = fam.router(dict(fam.moe_blocks(unmerged))[first]).weight  # Gemma 4's: router.proj.weight
        tree = next(n for n, p in unmerged.named_parameters() if p is trained)
        hub = next(n for n in orig if fam.rename(n) == tree)  # its name on disk
        assert torch.equal(merged[hub], trained)
        assert not torch.equal(trained, orig[hub].float())
    if fam.shared_expert_ungated:  # the shared experts: n_shared_experts × the merged expert size wide
        width = fam.shared_expert_intermediate_size(read_config(tmp_path / "out")[0])
        added = 0 if strategy == "embedded" else (N_ADAPTERS if strategy == "dense" else 1) * RANK
        base_width = fam.shared_expert_intermediate_size(cfg)
        assert width == (inter + widen) * -(-(base_width + added) // (inter + widen))
        assert merged["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (width, cfg.hidden_size)
        assert merged["model.layers.1.mlp.shared_experts.down_proj.weight"].shape == (cfg.hidden_size, width)
        if added and routing.get("layers") == [2]:  # layer 1 had no adapter: its shared expert is only padded
            assert merged["model.layers.1.mlp.shared_experts.up_proj.weight"][base_width:].abs().max() == 0
            assert merged["model.layers.2.mlp.shared_experts.up_proj.weight"][base_width:][:added].abs().min() > 0

    groups = {g["group"]: g for g in report["merged"]}
    assert report["exact"] and all(g["exact"] for g in groups.values())
    assert groups[strategy]["strategy"] == strategy and groups[strategy]["kind"] == kind
    assert ("attention" in groups) == bool(routing.get("attention_lora"))
    assert ("router" in groups) == bool(routing.get("train_router"))
    # the report is written last, the folder holds exactly the export, no staging folder is left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(report["files"] + [REPORT_FILE])
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_nf4_run_merges_into_dequantised_weights(checkpoint, tmp_path):
    """model.quant nf4 and model.attention_quant nf4: the merge starts from the NF4-dequantised experts
    and attention weights the adapters were trained against, not from the checkpoint's own values."""
    import bitsandbytes.functional as BF

    from engine.model import NF4ExpertStore

    ckpt = checkpoint("qwen3_moe")
    fam = get_family("qwen3_moe")
    unmerged = make_run(ckpt, tmp_path / "run", "embedded", "lora", "inside", quant="nf4", attention_quant="nf4",
                        attention_lora=True)
    report = export_run(tmp_path / "run", "hf", "f32", tmp_path / "out")
    ids = ids_for(ckpt)
    assert_close(logits(reload(tmp_path / "out"), ids), logits(unmerged, ids))
    assert report["max_abs_logit_diff"] <= bound(report["check"]["max_abs_logit"])

    # expert 1 of layer 0: NF4 round trip of the checkpoint's gate/up, plus the LoRA update
    orig, merged = tensors(ckpt), tensors(tmp_path / "out")
    name = {p: fam.expert_key_name(ExpertKey(0, 1, p)) for p in ("gate", "up", "down")}
    gate_up = torch.cat([orig[name["gate"]], orig[name["up"]]])
    store = NF4ExpertStore.from_experts([(gate_up, orig[name["down"]])])
    deq_gate_up, _ = store.weights(0, "cpu", torch.float32)
    bank = unmerged.model.layers[0].mlp.experts.inside["gate"]
    delta = (bank.up[1] @ bank.down[1]) * (ALPHA / RANK)
    inter = gate_up.shape[0] // 2
    torch.testing.assert_close(merged[name["gate"]], deq_gate_up[:inter] + delta, rtol=0, atol=1e-6)
    assert (merged[name["gate"]] - (orig[name["gate"]].float() + delta)).abs().max() > 1e-3  # NF4, not the original
    # attention: NF4 round trip of q_proj (as bitsandbytes' Linear4bit computes with it), plus the LoRA update
    q = orig["model.layers.1.self_attn.q_proj.weight"]
    packed, state = BF.quantize_4bit(q, blocksize=64, compress_statistics=True, quant_type="nf4")
    state.dtype = torch.float32
    lora = unmerged.model.layers[1].self_attn.q_proj.lora
    delta = (lora.up[0] @ lora.down[0]) * (ALPHA / RANK)
    merged_q = merged["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged_q, BF.dequantize_4bit(packed, state) + delta, rtol=0, atol=1e-6)
    assert (merged_q - (q.float() + delta)).abs().max() > 1e-3
    groups = {g["group"]: g for g in report["merged"]}
    assert groups["experts"]["kind"] == "nf4" and "NF4" in groups["experts"]["how"]
    assert groups["linear"]["kind"] == "nf4" and "attention_quant" in groups["linear"]["how"]


#: median over positions of the largest logit difference, as a fraction of the largest logit (measured:
#: f16 0.04 %, bf16 0.4 %); the maximum is not bounded: a position whose top-k experts flip under the
#: rounding moves by up to a third of the logits' range
_MEDIAN = {"f16": 0.002, "bf16": 0.01}


@pytest.mark.parametrize("dtype, torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_exports_are_close(checkpoint, tmp_path, dtype, torch_dtype):
    ckpt = checkpoint("mixtral")
    unmerged = make_run(ckpt, tmp_path / "run", "embedded", "gated", attention_lora=True)
    report = export_run(tmp_path / "run", "hf", dtype, tmp_path / "out")
    merged = tensors(tmp_path / "out")
    assert {t.dtype for t in merged.values()} == {torch_dtype}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(torch_dtype)[6:]
    ids = ids_for(ckpt)
    want, got = logits(unmerged, ids), logits(reload(tmp_path / "out"), ids)
    per_position = (got - want).abs().amax(-1).flatten()
    assert 0 < per_position.median() < _MEDIAN[dtype] * want.abs().max()
    check = report["check"]
    assert 0 < check["median_abs_logit_diff"] < _MEDIAN[dtype] * check["max_abs_logit"]
    assert check["median_abs_logit_diff"] <= report["max_abs_logit_diff"]


# ---- refusals ----------------------------------------------------------------------------------------------

#: (family, config edits, strategy, kind, placement, routing extras, format, phrases the message must hold)
REFUSED = [
    ("olmoe", {}, "embedded", "bottleneck", "parallel", {}, "hf",
     ["'embedded'", "'bottleneck'", "No export format"]),
    ("olmoe", {}, "embedded", "lora", "parallel", {}, "gguf",
     ["'embedded'", "'lora'", "'parallel'", "No export format"]),
    ("mixtral", {}, "routed", "gated", "parallel", {}, "hf", ["'routed'", "own learned router", "No export format"]),
    ("mixtral", {}, "shared", "lora", "parallel", {}, "hf", ["'shared'", "'lora'", "No export format"]),
    ("olmoe", {}, "shared", "gated", "parallel", {}, "gguf", ["'shared'", "norm_topk_prob=false", "No export format"]),
    ("qwen2_moe", {}, "dense", "gated", "parallel", {}, "hf", ["'dense'", "sigmoid", "No export format"]),
    ("mixtral", {}, "embedded", "gated", "parallel", {}, "peft",
     ["'embedded'", "gated", "Formats that work for this run: hf, gguf."]),
    ("olmoe", {}, "embedded", "lora", "inside", {"train_router": True}, "peft",
     ["routing.train_router", "Formats that work for this run: hf, gguf."]),
    ("qwen3_moe", {"norm_topk_prob": False}, "embedded", "gated", "parallel", {}, "gguf",
     ["llama.cpp", "norm_topk_prob=False", "Formats that work for this run: hf."]),
]


@pytest.mark.parametrize("family, edits, strategy, kind, placement, routing, fmt, phrases", REFUSED,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4]}-{c[6]}" for c in REFUSED])
def test_runs_without_an_exact_export_are_refused(checkpoint, tmp_path, family, edits, strategy, kind, placement,
                                                  routing, fmt, phrases):
    make_run(checkpoint(family, **edits), tmp_path / "run", strategy, kind, placement, **routing)
    with pytest.raises(ExportError) as err:
        export_run(tmp_path / "run", fmt, "f16", tmp_path / "out")
    message = str(err.value)
    assert f"as {fmt}" in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_options_and_output_folders_are_refused(checkpoint, tmp_path):
    ckpt = checkpoint("olmoe")
    make_run(ckpt, tmp_path / "run", "embedded", "gated")
    with pytest.raises(ExportError, match=r"export\.dtype \(--dtype\) 'q8_0' .*--format hf \(q8_0 is for "
                                          r"--format gguf"):
        export_run(tmp_path / "run", "hf", "q8_0", tmp_path / "out")
    with pytest.raises(ExportError, match=r"export\.format \(--format\) 'onnx' is not one of hf, peft, gguf"):
        export_run(tmp_path / "run", "onnx", "f16", tmp_path / "out")
    with pytest.raises(ExportError, match="is the base model folder"):
        export_run(tmp_path / "run", "hf", "f16", ckpt)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty and holds no earlier export"):
        export_run(tmp_path / "run", "hf", "f16", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # an earlier export is replaced whole: the GGUF export leaves no HF files of the first one behind
    export_run(tmp_path / "run", "hf", "f16", tmp_path / "out", check_logits=False)
    report = export_run(tmp_path / "run", "gguf", "q8_0", tmp_path / "out", check_logits=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export_report.json", "model-q8_0.gguf"]
    assert report["max_abs_logit_diff"] is None and report["gguf"]["dtype"] == "q8_0"


# ---- PEFT layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_peft_tensors_applied_by_hand_equal_the_merge(checkpoint, tmp_path, family):
    from safetensors.torch import load_file

    ckpt = checkpoint(family)
    fam = get_family(family)
    cfg = read_config(ckpt)[0]
    make_run(ckpt, tmp_path / "run", "embedded", "lora", "inside", attention_lora=True)
    report = export_run(tmp_path / "run", "peft", "f32", tmp_path / "peft")
    export_run(tmp_path / "run", "hf", "f32", tmp_path / "hf", check_logits=False)

    lora = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert config["base_model_name_or_path"] == str(ckpt)
    # in transformers 5's terms, as PEFT converts per-expert LoRA (tests/test_export_ecosystem.py loads it in PEFT)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["gate_up_proj", "down_proj"]
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 2 * RANK}

    E, L = fam.num_experts(cfg), cfg.num_hidden_layers
    base, merged = tensors(ckpt), tensors(tmp_path / "hf")
    expected = [fam.expert_key_name(ExpertKey(l, e, p))
                for l in range(L) for e in range(E) for p in ("gate", "up", "down")]
    expected += [f"model.layers.{l}.self_attn.{p}.weight"
                 for l in range(L) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    stems = ["base_model.model." + n.removesuffix(".weight") for n in expected]
    assert sorted(lora) == sorted(f"{s}.lora_{x}.weight" for s in stems for x in "AB")
    for name, stem in zip(expected, stems):
        A, B = lora[f"{stem}.lora_A.weight"], lora[f"{stem}.lora_B.weight"]
        out_features, in_features = base[name].shape
        assert A.shape == (RANK, in_features) and B.shape == (out_features, RANK)
        by_hand = base[name].float() + (B @ A) * (ALPHA / RANK)
        torch.testing.assert_close(merged[name], by_hand, rtol=0, atol=1e-6)
    # every other tensor of the merge is the base's own
    for name in set(base) - set(expected):
        assert torch.equal(merged[name], base[name].float()), name
    assert report["max_abs_logit_diff"] <= bound(report["check"]["max_abs_logit"])
    assert {g["group"] for g in report["merged"]} == {"embedded", "attention", "experts"}


# ---- GGUF of a merged model --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "ernie4_5_moe"])  # ERNIE: shared experts padded too
def test_merged_widened_model_runs_in_llama_cpp(checkpoint, tmp_path, family):
    """A merged embedded-gated model (experts widened by r) continues prompts in llama.cpp exactly as the
    merged HF checkpoint does in transformers, and differently from the base model."""
    import gguf

    from engine.export import llama_child

    from .test_export_gguf import PROMPTS, _hf_greedy, cpp_greedy

    if not llama_child.llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    ckpt = checkpoint(family, sharp=True)
    make_run(ckpt, tmp_path / "run", "embedded", "gated", scale=0.5, attention_lora=True)
    report = export_run(tmp_path / "run", "gguf", "f32", tmp_path / "gguf")
    export_run(tmp_path / "run", "hf", "f32", tmp_path / "hf", check_logits=False)
    for check in (report["check"], report["llama_cpp"]):  # transformers, then llama.cpp, on the merged model
        check_positions(check["median_abs_logit_diff"], check["max_abs_logit_diff"], check["max_abs_logit"],
                        what=check["compared"])

    path = tmp_path / "gguf" / "model-f32.gguf"
    fam, cfg = get_family(family), read_config(ckpt)[0]
    inter = fam.expert_intermediate_size(cfg)
    exps = {t.name: t for t in gguf.GGUFReader(path).tensors}[f"blk.{fam.moe_layers(cfg)[0]}.ffn_gate_exps.weight"]
    assert int(exps.shape[1]) == inter + RANK

    merged, base = load_model(tmp_path / "hf").model, load_model(ckpt).model
    changed = 0
    for prompt, (got, got_logits) in zip(PROMPTS, cpp_greedy(llama_child, path, PROMPTS)):
        want, want_logits = _hf_greedy(merged, prompt)
        assert got == want, f"prompt {prompt}: llama.cpp continued {got}, transformers {want}"
        assert_logits_close(got_logits, want_logits, what=f"prompt {prompt}")
        changed += _hf_greedy(base, prompt)[0] != want
    assert changed > 0


def test_large_merges_are_sharded_with_an_index(checkpoint, tmp_path):
    from engine.export.merge import write_merged
    from engine.export.source import open_run

    ckpt = checkpoint("qwen2_moe")
    unmerged = make_run(ckpt, tmp_path / "run", "embedded", "gated")
    summary = write_merged(open_run(tmp_path / "run"), tmp_path / "out", torch.float32, max_shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert [f for f in summary["files"] if f.endswith(".safetensors")] == shards
    assert "model.safetensors.index.json" in summary["files"]
    assert sorted(index["weight_map"]) == sorted(tensors(ckpt))
    ids = ids_for(ckpt)
    assert_close(logits(reload(tmp_path / "out"), ids), logits(unmerged, ids))


def test_logit_check_is_skipped_with_its_reason_when_host_memory_is_short(checkpoint, tmp_path, monkeypatch):
    """By default the check runs when two fp32 copies of the base fit in half the free memory; otherwise the
    export still happens and the report says why the check was skipped."""
    import os

    make_run(checkpoint("olmoe"), tmp_path / "run", "embedded", "gated")
    report = export_run(tmp_path / "run", "hf", "f16", tmp_path / "roomy")
    assert report["check"]["max_abs_logit_diff"] == report["max_abs_logit_diff"] < 0.05
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real(name))
    report = export_run(tmp_path / "run", "hf", "f16", tmp_path / "short")
    assert report["max_abs_logit_diff"] is None and "this machine has 0.0 GB free" in report["check"]["skipped"]
    saved = json.loads((tmp_path / "short" / "export_report.json").read_text())
    assert saved["check"] == report["check"] and (tmp_path / "short" / "config.json").is_file()


# ---- llama.cpp runs the exported file, in a child process --------------------------------------------------


@pytest.fixture
def llama_child():
    from engine.export import llama_child

    if not llama_child.llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    return llama_child


def test_a_native_crash_in_llama_cpp_is_an_error_naming_the_signal(llama_child, tiny_checkpoint, tmp_path):
    from engine.export import write_gguf

    write_gguf(tiny_checkpoint("olmoe"), tmp_path / "model.gguf", dtype="f16")
    for name in ("SIGSEGV", "SIGABRT"):
        with pytest.raises(llama_child.LlamaCppCrash, match=f"crashed with {name}") as crash:
            llama_child.run_llama(tmp_path / "model.gguf", [("logits", [1, 2, 3]), ("raise_signal", name)])
        assert crash.value.signal_name == name
    assert llama_child.run_llama(tmp_path / "model.gguf", [("logits", [1, 2, 3])])[0].shape == (3, 512)


def test_q8_0_export_is_run_in_llama_cpp_and_reported(llama_child, checkpoint, tmp_path):
    """On a CPU whose llama.cpp build crashes on Q8_0 (AMX), the export survives, says why and what works, and
    the file still gives the merged model's logits with repacking off; elsewhere it simply runs."""
    import warnings

    make_run(checkpoint("qwen3_moe"), tmp_path / "run", "embedded", "lora", placement="inside")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_run(tmp_path / "run", "gguf", "q8_0", tmp_path / "out")
    cpp = report["llama_cpp"]
    if cpp.get("crashed"):
        assert cpp["crashed"] == "SIGSEGV" and llama_child.amx_risk("q8_0"), cpp
        assert "--no-repack" in cpp["known_issue"] and "--no-repack" in cpp["runs_with"]
        assert any("--no-repack" in str(w.message) for w in caught)
    else:  # ran here; on a CPU with AMX the report still says what a native llama.cpp build does with it
        assert ("note" in cpp) == bool(llama_child.amx_risk("q8_0")), cpp
    q8 = 2.0 ** -7  # q8_0 rounds weights and activations to 8-bit steps of their block's largest value
    assert cpp["median_abs_logit_diff"] < 32 * q8 * cpp["max_abs_logit"], cpp
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["llama_cpp"] == cpp and (tmp_path / "out" / "model-q8_0.gguf").is_file()


def test_a_crash_on_an_amx_cpu_is_reported_with_its_workaround(checkpoint, tmp_path, monkeypatch):
    """The AMX path on any machine: the first run (llama.cpp's default buffers) dies with SIGSEGV, the report
    names the bug and the way around it, and the run without repacking is compared."""
    import numpy as np

    from engine.export import llama_child

    calls = []

    def fake_run(path, ops, repack=True, **kw):
        calls.append(repack)
        if repack:
            raise llama_child.LlamaCppCrash("crashed with SIGSEGV", "SIGSEGV")
        return [np.zeros((len(op[1]), 512), np.float32) for op in ops]

    monkeypatch.setattr(llama_child, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(llama_child, "run_llama", fake_run)
    monkeypatch.setattr(llama_child, "cpu_has_amx", lambda: True)
    make_run(checkpoint("olmoe"), tmp_path / "run", "embedded", "lora", placement="inside")
    with pytest.warns(UserWarning, match=r"model-q8_0.gguf: llama.cpp's CPU backend crashes .*--no-repack"):
        report = export_run(tmp_path / "run", "gguf", "q8_0", tmp_path / "out")
    assert calls == [True, False] and report["llama_cpp"]["crashed"] == "SIGSEGV"
    assert report["llama_cpp"]["max_abs_logit_diff"] > 0  # the zeros above are compared, not trusted
    with pytest.warns(UserWarning, match="--no-repack"):  # no check run: still warned
        report = export_run(tmp_path / "run", "gguf", "q8_0", tmp_path / "unchecked", check_logits=False)
    assert "warning" in report["llama_cpp"] and "skipped" in report["llama_cpp"]
    monkeypatch.setattr(llama_child, "cpu_has_amx", lambda: False)  # an unknown crash is reported, not hidden
    with pytest.warns(UserWarning, match=r"llama.cpp crashed \(SIGSEGV\)"):
        report = export_run(tmp_path / "run", "gguf", "q8_0", tmp_path / "other")
    assert report["llama_cpp"]["crashed"] == "SIGSEGV" and "known_issue" not in report["llama_cpp"]
