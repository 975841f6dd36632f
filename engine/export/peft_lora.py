"""PEFT-layout LoRA: per-expert 2-D `lora_A` [r, in] / `lora_B` [out, r] tensors named after the base
checkpoint's own (hub, per-expert) weight names, plus `adapter_config.json` — the layout llama.cpp's
convert_lora_to_gguf.py reads (it strips `base_model.model.` and `.lora_A/B` to find the base tensor, and
stacks per-expert LoRA like the experts themselves), and the per-expert layout HF PEFT converts onto
transformers 5's fused experts when it loads an adapter (peft/utils/transformers_weight_conversion.py:
lora_A concatenated, lora_B block-diagonal). Only pure-LoRA runs fit it.

The config is the one PEFT's own conversion arrives at on transformers 5, written out so that it holds for
every family (PEFT 0.21 converts the config of OLMoE, Mixtral and Qwen3-MoE but not of Qwen2-MoE, whose
per-expert names would then also catch the shared expert's linears): attention in `target_modules`, the
fused expert tensors in `target_parameters`, and `gate_up_proj` at rank 2r and alpha 2·alpha in
`rank_pattern` / `alpha_pattern` (gate and up side by side keep alpha/r). PEFT's key conversion still runs
on the per-expert tensors. PEFT warns that these patterns "did not match any targeted module": it checks
them against modules only, and applies them to the parameters all the same (its own conversion gets the
same warning).

Families whose hub checkpoints hold each layer's experts fused (`Family.peft_per_expert` False: gpt-oss) have no
per-expert names for PEFT to convert, so their expert LoRA is written in PEFT's own `target_parameters` form, the
tensors a `lora.ParamWrapper` holds for a fused [E, ·, ·] parameter (peft/tuners/lora/layer.py): lora_A [E·R, in]
(read as (E, R, in)) and lora_B [out, R·E] (read as (out, R, E)), in / out the expert's nn.Linear axes whichever
way the module stores them (`Family.experts_transposed`). down_proj takes the per-expert LoRA side by side;
gate and up, two rank-r LoRAs, are one rank-2r LoRA on gate_up_proj: A = [A_gate; A_up], B with B_gate in gate's
output rows and B_up in up's (where `Family.fused_view` puts them: gpt-oss interleaves them), zeros elsewhere. PEFT
nests the wrappers of one module's parameters, so the keys are `….experts.base_layer.lora_A.weight` (gate_up_proj,
wrapped first) and `….experts.lora_A.weight` (down_proj). Expert biases are not adapted (bias "none"), and the
experts' activation (gpt-oss's clamped SwiGLU) runs on the adapted weights as on the base ones."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.arch import ExpertKey, Family
from ..model import checkpoint_files
from .errors import ExportError
from .gguf import require_finite
from .merge import MergeGroup
from .source import RunSource

PREFIX = "base_model.model."
TENSOR_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
#: the fused expert parameters the LoRA adapts, in the order transformers' experts modules register them: PEFT wraps
#: a module's targeted parameters in that order (peft/tuners/tuners_utils.py, `named_parameters(recurse=False)`), each
#: ParamWrapper around the one before, so the first is the innermost (`experts.base_layer.lora_A.weight`)
FUSED = ("gate_up_proj", "down_proj")
_FUSED_STEM = re.compile(r"(?P<module>.+\.experts)(?P<depth>(?:\.base_layer)*)")


def peft_problems(src: RunSource) -> list[str]:
    """Why the run is not a pure LoRA adapter on base weights (empty: it is)."""
    r, a = src.cfg.routing, src.cfg.adapter
    problems = []
    if r.strategy != "none" and not (r.strategy == "embedded" and a.placement == "inside"):
        problems.append(f"routing.strategy {r.strategy!r} with a {a.placement} {a.kind} adapter adds a module of its "
                        "own rather than a LoRA update of a base weight (only embedded LoRA placed inside the "
                        "experts, and attention LoRA, are)")
    if src.trained:
        problems.append("the run trains the MoE router (routing.train_router): a full weight, which a LoRA "
                        "adapter cannot carry")
    return problems


def peft_plan(src: RunSource) -> list[MergeGroup]:
    """How the PEFT layout holds each trained group of the run."""
    r = src.cfg.routing
    groups = []
    if r.strategy == "embedded":
        how = ("per-expert lora_A [r, in] / lora_B [out, r] on each expert's gate, up and down projections"
               if src.family.peft_per_expert else "PEFT target_parameters LoRA on the fused experts: down_proj at "
               "rank r, gate_up_proj at rank 2r (gate's and up's LoRA side by side), one per expert")
        groups.append(MergeGroup("embedded", "embedded", "lora", how, True, list(src.peft.layers)))
    if r.attention_lora:
        layers = sorted({int(n.split(".")[2]) for n in src.attention_loras()})
        groups.append(MergeGroup("attention", "attention", "lora", "lora_A / lora_B on q/k/v/o_proj", True, layers))
    held = "NF4-dequantised" if src.cfg.model.quant == "nf4" else "bf16"
    if src.nf4_linears:
        held += " (and NF4 attention and other linear layers)"
    groups.append(MergeGroup("experts", "base", src.cfg.model.quant, f"not in the adapter: the run trained against "
                             f"{held} experts; the adapter applies to whatever base it is loaded on (the check "
                             "applies it to the original checkpoint, so its difference includes that rounding)",
                             True, list(src.facts.moe_layers)))
    return groups


def hub_names(base: Path) -> dict[str, str]:
    """Module-tree name -> checkpoint name of every non-expert weight of a base checkpoint (headers only)."""
    from safetensors import safe_open

    from ..model.arch import get_family

    family = get_family(json.loads((base / "config.json").read_text())["model_type"])
    names = {}
    for file in checkpoint_files(base):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                names[family.rename(name)] = name
    return names


def peft_tensors(src: RunSource) -> dict[str, torch.Tensor]:
    """The run's LoRA as PEFT tensors in fp32: `base_model.model.<checkpoint name>.lora_A.weight` [r, in]
    and `.lora_B.weight` [out, r]."""
    problems = peft_problems(src)
    if problems:
        raise ExportError("this run is not a pure LoRA adapter: " + "; ".join(problems) + ".")
    out: dict[str, torch.Tensor] = {}

    def put(weight_name: str, bank, idx: int) -> None:
        stem = PREFIX + src.family.peft_name(weight_name).removesuffix(".weight")
        out[f"{stem}.lora_A.weight"] = bank.down[idx].float().contiguous()
        out[f"{stem}.lora_B.weight"] = bank.up[idx].float().contiguous()

    hub = hub_names(src.base)
    for target, module in sorted(src.attention_loras().items()):
        if target not in hub:
            raise ExportError(f"{src.base} has no tensor for {target}, which the run's attention LoRA adapts.")
        put(hub[target], module.lora, 0)
    for layer, bank in sorted(src.peft.banks.items()):
        if bank.inside is None:
            continue
        for proj, lora in bank.inside.items():
            for e in range(lora.num):
                put(src.family.expert_key_name(ExpertKey(layer, e, proj)), lora, e)
    return out


def experts_module(family: Family, layer: int) -> str:
    """The name of one layer's fused experts module in the model PEFT users load (`Family.peft_module`)."""
    return family.peft_module(family.experts_name(layer))


def fused_key(family: Family, layer: int, attr: str, part: str) -> str:
    """PEFT's state-dict key of lora_A or lora_B (`part` "A" / "B") on one fused expert parameter `attr`."""
    return f"{PREFIX}{experts_module(family, layer)}.{'base_layer.' * (len(FUSED) - 1 - FUSED.index(attr))}" \
           f"lora_{part}.weight"


def gate_up_rows(family: Family, inter: int) -> dict[str, torch.Tensor]:
    """Where the gate's and the up projection's output units sit along gate_up_proj's output axis, read off the
    family's own `fused_view` of an index tensor laid out as the module stores gate_up_proj (in-axis of size 1)."""
    index = torch.arange(2 * inter)
    probe = index.view(1, 1, -1) if family.experts_transposed else index.view(1, -1, 1)
    return {p: family.fused_view(probe, "gate_up_proj", 0, p).reshape(-1) for p in ("gate", "up")}


def fused_tensors(src: RunSource, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (peft_tensors) with every layer's per-expert LoRA replaced by PEFT's target_parameters tensors
    on the fused gate_up_proj (rank 2r) and down_proj (rank r); the rest unchanged."""
    family, out = src.family, {}
    experts: dict[int, dict[str, dict[int, dict[str, torch.Tensor]]]] = {}
    for name, t in tensors.items():
        stem, _, part = name.removesuffix(".weight").rpartition(".lora_")
        key = family.parse_expert_key(stem.removeprefix(PREFIX) + ".weight")
        if key is None:
            out[name] = t
        else:
            experts.setdefault(key.layer, {}).setdefault(key.proj, {}).setdefault(key.expert, {})[part] = t
    n = src.facts.num_experts
    for layer, projs in sorted(experts.items()):
        if sorted(projs) != ["down", "gate", "up"] or any(sorted(p) != list(range(n)) for p in projs.values()):
            raise ExportError(f"layer {layer}'s expert LoRA does not cover gate, up and down of all {n} experts, "
                              "which PEFT's fused target_parameters layout needs.")
        inter, rank = projs["gate"][0]["B"].shape
        rows = gate_up_rows(family, inter)
        pairs = {"down_proj": [(projs["down"][e]["A"], projs["down"][e]["B"]) for e in range(n)], "gate_up_proj": []}
        for e in range(n):
            B = projs["gate"][e]["B"].new_zeros(2 * inter, 2 * rank)
            B[rows["gate"], :rank], B[rows["up"], rank:] = projs["gate"][e]["B"], projs["up"][e]["B"]
            pairs["gate_up_proj"].append((torch.cat([projs["gate"][e]["A"], projs["up"][e]["A"]]), B))
        for attr, per_expert in pairs.items():
            A = torch.stack([a for a, _ in per_expert])  # (E, R, in)
            B = torch.stack([b for _, b in per_expert], dim=-1)  # (out, R, E)
            out[fused_key(family, layer, attr, "A")] = A.reshape(-1, A.shape[-1]).contiguous()
            out[fused_key(family, layer, attr, "B")] = B.reshape(B.shape[0], -1).contiguous()
    return out


def peft_config(src: RunSource, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """adapter_config.json of the run's LoRA (PEFT's LoraConfig fields, in transformers 5's fused-expert terms),
    from its per-expert `peft_tensors`."""
    a = src.cfg.adapter
    attention, experts = set(), set()
    for name in tensors:
        if not name.endswith(".lora_A.weight"):
            continue
        weight = name.removeprefix(PREFIX).removesuffix(".lora_A.weight") + ".weight"
        key = src.family.parse_expert_key(weight)
        if key is None:
            attention.add(src.family.peft_module(src.family.rename(weight)).removesuffix(".weight"))
        else:
            experts.add(key.layer)
    n_layers = src.facts.num_layers
    modules = sorted({m.rsplit(".", 1)[-1] for m in attention})
    if len(attention) != len(modules) * n_layers:  # not every layer: name the modules themselves
        modules = sorted(attention)
    params: list[str] = []
    if experts:
        params = list(FUSED)
        if experts != set(src.facts.moe_layers):
            params = [f"{experts_module(src.family, layer)}.{p}" for layer in sorted(experts) for p in params]
    fused = {r".*\.gate_up_proj": 2} if experts else {}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(src.base),
            # PEFT's target_parameters LoRA refuses dropout (ParamWrapper: "does not work with lora_dropout != 0")
            "r": a.rank, "lora_alpha": a.alpha, "lora_dropout": 0.0 if params else a.dropout, "target_modules": modules,
            "target_parameters": params, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "rank_pattern": {k: n * a.rank for k, n in fused.items()},
            "alpha_pattern": {k: n * a.alpha for k, n in fused.items()}}


def write_peft(src: RunSource, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Write adapter_model.safetensors and adapter_config.json to `out_dir`; returns a summary."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(src)
    config = peft_config(src, tensors)
    if not src.family.peft_per_expert:
        tensors = fused_tensors(src, tensors)
    written = {n: t.to(dtype) for n, t in tensors.items()}
    for name, t in written.items():
        require_finite(name, t, str(dtype).removeprefix("torch."))
    save_file(written, str(out_dir / TENSOR_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return {"files": [TENSOR_FILE, CONFIG_FILE], "tensors": len(tensors), "target_modules": config["target_modules"],
            "target_parameters": config["target_parameters"],
            "layout": "per-expert" if src.family.peft_per_expert else "fused"}


def apply_peft(model: nn.Module, family: Family, tensors: dict[str, torch.Tensor], alpha: float, rank: int) -> int:
    """Add (alpha/r)·B·A of every PEFT LoRA pair to a transformers model's weights, by hand (per-expert, attention
    and fused target_parameters pairs; gate_up_proj's 2α / 2r is alpha/r too); returns pairs applied."""
    scale = alpha / rank
    blocks = dict(family.moe_blocks(model))
    done = 0
    with torch.no_grad():
        for name in tensors:
            if not name.endswith(".lora_A.weight"):
                continue
            stem = name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            A, B = tensors[name].float(), tensors[f"{PREFIX}{stem}.lora_B.weight"].float()
            key, fused = family.parse_expert_key(stem + ".weight"), _FUSED_STEM.fullmatch(stem)
            if fused is not None:  # PEFT's target_parameters tensors: lora_A (E, R, in), lora_B (out, R, E)
                attr = FUSED[len(FUSED) - 1 - fused["depth"].count("base_layer")]
                weight = getattr(model.get_submodule(fused["module"]), attr)
                n = weight.shape[0]
                delta = torch.einsum("ore,eri->eoi", B.reshape(B.shape[0], -1, n), A.reshape(n, -1, A.shape[-1]))
                weight.add_(((delta.transpose(1, 2) if family.experts_transposed else delta) * scale).to(weight.dtype))
                done += 1
                continue
            if key is not None:
                weight = family.expert_views(blocks[key.layer], key.expert)[key.proj]
            else:  # the name in the model PEFT loads onto, which may be the hub's (Gemma 4's multimodal model)
                names = {n for n, _ in model.named_modules()}
                weight = model.get_submodule(stem if stem in names else family.rename(stem)).weight
            weight.add_(((B @ A) * scale).to(weight.dtype))
            done += 1
    return done
