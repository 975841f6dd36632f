"""Merge a run's adapters into its base model and save a HF checkpoint in the hub's per-expert layout.

Exact merges (to float rounding), by group:
- attention LoRA and `embedded` LoRA `inside` the experts: W + (alpha/r)·B·A into the adapted weight;
- `embedded` `gated` adapters: each expert widened by r (gate/up gain the adapter's W_g/W_u rows, down
  its W_d columns), since Σ g_e (E_e(h) + P_e(h)) is then exactly the MoE of the widened experts;
- `shared` / `dense` `gated` adapters, when the family renormalises its top-k gates (Σ g_e = 1): the
  adapter (dense: the N adapters side by side, one gated adapter of width N·r) widens every expert,
  as Σ g_e (E_e(h) + A(h)) = Σ g_e E_e(h) + A(h). Never into Qwen2-MoE's shared expert: its output is
  scaled by a per-token sigmoid gate, which would scale the adapter too;
- `shared` / `dense` `gated` adapters on families whose shared expert is ungated (DeepSeek: added with weight
  1 whatever the router does): the adapter widens the shared expert (by whole experts where its width is a
  multiple of the expert size: DeepSeek's `n_shared_experts` grows, the new columns zero beyond the adapter);
- a trained MoE router: its weights are written in place of the base router.
Layers without adapters get zero rows/columns to the common width (silu(0)·0 = 0 adds nothing).
Everything else (routed adapters, bottleneck, LoRA beside the experts or the block, shared adapters
under gates that do not sum to one) has no exact merge and is refused with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ExportError
from .gguf import require_finite
from .source import RunSource, expert_stores, expert_weights, non_expert_tensors, nf4_round_trip, quant_note

#: tokenizer and generation files copied from the base checkpoint
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
#: largest safetensors shard written (bytes)
MAX_SHARD_BYTES = 4 * 1024 ** 3


@dataclass
class MergeGroup:
    """One group of trained tensors and how an export represents it."""

    group: str  # attention | embedded | shared | dense | routed | router | experts
    strategy: str
    kind: str
    how: str
    exact: bool
    layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The group as a JSON-ready dict (one entry of the report's `merged`)."""
        return asdict(self)


def renormalises(src: RunSource) -> bool:
    """Whether the family's top-k gates sum to one (Mixtral always, the others with norm_topk_prob; DeepSeek-V3's
    renormalised gates are then scaled by routed_scaling_factor)."""
    return src.family.topk_gate_sum(src.hf_config) == 1.0


def into_shared_expert(src: RunSource) -> bool:
    """Whether shared / dense gated adapters merge into the family's ungated shared expert."""
    return src.family.shared_expert_ungated and src.family.shared_expert_intermediate_size(src.hf_config) > 0


def merge_plan(src: RunSource) -> list[MergeGroup]:
    """What a merged checkpoint does with each trained group of the run, and whether that is exact."""
    r, a, f = src.cfg.routing, src.cfg.adapter, src.facts
    layers = list(src.peft.layers)
    groups: list[MergeGroup] = []
    if r.strategy == "embedded":
        if a.placement == "inside":
            groups.append(MergeGroup("embedded", "embedded", "lora", "LoRA folded into each expert's gate, up and "
                                     "down projections: W + (alpha/r)·B·A", True, layers))
        elif a.kind == "gated":
            groups.append(MergeGroup("embedded", "embedded", "gated", f"each expert widened by r={a.rank}: its own "
                                     "adapter's W_g, W_u rows appended to gate, up and W_d columns to down", True,
                                     layers))
        else:
            groups.append(MergeGroup("embedded", "embedded", a.kind, f"not merged: a parallel {a.kind} adapter beside "
                                     f"each expert adds {_form(a.kind)}, which no SwiGLU expert computes (adapter.kind "
                                     "gated, the expert's own form, or LoRA with adapter.placement inside, merges)",
                                     False, layers))
    elif r.strategy in ("shared", "dense"):
        width = a.rank if r.strategy == "shared" else r.num_adapters * a.rank
        what = "the adapter" if r.strategy == "shared" else f"the {r.num_adapters} adapters side by side"
        if a.kind != "gated":
            groups.append(MergeGroup(r.strategy, r.strategy, a.kind, f"not merged: a {r.strategy} {a.kind} adapter "
                                     f"beside the MoE block adds {_form(a.kind)}, which no SwiGLU expert computes "
                                     "(adapter.kind gated merges, on families whose top-k gates sum to 1)",
                                     False, layers))
        elif into_shared_expert(src):
            groups.append(MergeGroup(r.strategy, r.strategy, "gated", f"{what} appended to the shared experts, which "
                                     "are added with weight 1 (no gate), widening them: A(h) + S(h) is one SwiGLU "
                                     f"{width} columns wider", True, layers))
        elif renormalises(src):
            groups.append(MergeGroup(r.strategy, r.strategy, "gated", f"{what} added to every routed expert, widening "
                                     f"it by {width}: the top-k gates sum to 1, so Σ g_e·(E_e + A) = Σ g_e·E_e + A",
                                     True, layers))
        else:
            why = (f"not merged: {src.family.title} does not renormalise its top-k gates (norm_topk_prob=false), so "
                   "they sum to less than 1 and an adapter added to every expert would be scaled by that sum")
            if src.family.shared_expert_intermediate_size(src.hf_config):
                why += ("; its shared expert is scaled by a per-token sigmoid gate σ(w·h), so an adapter put "
                        "there would be scaled too")
            why += " (embedded gated adapters merge on every family)"
            groups.append(MergeGroup(r.strategy, r.strategy, "gated", why, False, layers))
    elif r.strategy == "routed":
        groups.append(MergeGroup("routed", "routed", a.kind, "not merged: routed adapters follow their own learned "
                                 "router (softmax over the N adapters, top-k), which no tensor of the base "
                                 "architecture computes (the embedded strategy uses the MoE's own router and merges "
                                 "with adapter.kind gated)", False, layers))
    if r.attention_lora:
        attn = sorted({int(re.search(r"layers\.(\d+)\.", n)[1]) for n in src.attention_loras()})
        groups.append(MergeGroup("attention", "attention", "lora", "LoRA folded into q/k/v/o_proj: "
                                 "W + (alpha/r)·B·A", True, attn))
    if src.trained:
        trained_layers = sorted({int(m[1]) for n in src.trained if (m := re.search(r"layers\.(\d+)\.", n))})
        groups.append(MergeGroup("router", "router", "full", "trained MoE router weights written in place of the "
                                 "base router's", True, trained_layers))
    groups.append(MergeGroup("experts", "base", src.cfg.model.quant, quant_note(src.cfg), True, list(f.moe_layers)))
    if src.nf4_linears:
        groups.append(MergeGroup("linear", "base", "nf4", "NF4-dequantised: the run held attention and the other "
                                 "frozen linear layers in NF4 (model.attention_quant nf4), so those weights (and the "
                                 "attention LoRA merged into them) start from the dequantised values", True,
                                 list(range(f.num_layers))))
    return groups


def merge_problems(src: RunSource) -> list[str]:
    """Why the run cannot be merged exactly (empty: it can)."""
    placement = f", adapter.placement {src.cfg.adapter.placement!r}" if src.cfg.routing.strategy == "embedded" else ""
    return [f"routing.strategy {g.strategy!r} with adapter.kind {g.kind!r}{placement}: "
            f"{g.how.removeprefix('not merged: ')}" for g in merge_plan(src) if not g.exact]


def _form(kind: str) -> str:
    return {"lora": "a linear map (alpha/r)·B·A·h", "bottleneck": "W_up·SiLU(W_down·h)"}.get(kind, kind)


# ---- the merged tensors ---------------------------------------------------------------------------------


def widening(src: RunSource) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per MoE layer with a gated adapter to merge, per expert: (gate rows [R, H], up rows [R, H],
    down columns [H, R]) in fp32, the adapter's scaling folded into the down columns."""
    r = src.cfg.routing
    out = {}
    gate_scales = _expert_gate_scales(src) if r.strategy in ("shared", "dense") else {}
    for layer in src.peft.layers:
        if r.strategy == "embedded" and src.cfg.adapter.kind == "gated" and src.cfg.adapter.placement == "parallel":
            bank = src.peft.banks[layer].parallel
            out[layer] = [(bank.down[e].float(), bank.gate_up[e].float(), bank.up[e].float() * bank.scale)
                          for e in range(bank.num)]
        elif r.strategy in ("shared", "dense") and src.cfg.adapter.kind == "gated" and not into_shared_expert(src):
            bank = src.block(layer).peft.bank
            n, rank, hidden = bank.down.shape
            piece = (bank.down.float().reshape(n * rank, hidden), bank.gate_up.float().reshape(n * rank, hidden),
                     (bank.up.float() * bank.scale).permute(1, 0, 2).reshape(hidden, n * rank))
            scales = gate_scales.get(layer)
            if scales is not None and bool((scales == 0).any()):
                raise ExportError(f"layer {layer}: an expert's gate scale is 0, so the {r.strategy} adapter cannot be "
                                  "merged into it; export with --format peft or gguf-lora instead.")
            # each expert's copy divided by the scale its gate is multiplied by (Gemma 4's per_expert_scale)
            out[layer] = [piece] * src.facts.num_experts if scales is None else \
                [(piece[0], piece[1], piece[2] / float(s)) for s in scales.float()]
    return out


def _expert_gate_scales(src: RunSource) -> dict[int, torch.Tensor]:
    """Per MoE layer, the factors its router multiplies the top-k gates by (Gemma 4's per_expert_scale), read from the
    base checkpoint; empty for families without them."""
    from ..model import read_tensors

    names = {name: layer for layer in src.peft.layers if (name := src.family.expert_gate_scale_name(layer))}
    return {names[n]: t.float() for n, t in read_tensors(src.base, lambda n: n in names)} if names else {}


def shared_widening(src: RunSource) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per MoE layer with a shared / dense gated adapter that merges into the ungated shared expert: (gate rows
    [R, H], up rows [R, H], down columns [H, R]) in fp32, the adapters side by side, their scaling in the columns."""
    r = src.cfg.routing
    if r.strategy not in ("shared", "dense") or src.cfg.adapter.kind != "gated" or not into_shared_expert(src):
        return {}
    out = {}
    for layer in src.peft.layers:
        bank = src.block(layer).peft.bank
        n, rank, hidden = bank.down.shape
        out[layer] = (bank.down.float().reshape(n * rank, hidden), bank.gate_up.float().reshape(n * rank, hidden),
                      (bank.up.float() * bank.scale).permute(1, 0, 2).reshape(hidden, n * rank))
    return out


def merged_shared_layout(src: RunSource) -> tuple[int, dict]:
    """(width, config.json edits) of the ungated shared expert after the merge; (0, {}) when it does not change."""
    fam, cfg = src.family, src.hf_config
    extra = max((w[0].shape[0] for w in shared_widening(src).values()), default=0)
    inter = merged_intermediate_size(src)
    if not fam.shared_expert_ungated or (not extra and inter == src.facts.expert_intermediate_size):
        return 0, {}
    return fam.shared_expert_layout(cfg, inter, extra)


def merged_intermediate_size(src: RunSource) -> int:
    """The experts' intermediate size after the merge (the base size plus the widest adapter)."""
    extra = max((w[0][0].shape[0] for w in widening(src).values()), default=0)
    return src.facts.expert_intermediate_size + extra


def merged_tensors(src: RunSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, merged fp32 tensor) of the whole merged model, names as the base checkpoint's."""
    problems = merge_problems(src)
    if problems:
        raise ExportError("this run has no exact merge: " + "; ".join(problems) + ".")
    fam, facts = src.family, src.facts
    deltas = {name: lora for name, lora in src.attention_loras().items()}
    trained = dict(src.trained)
    wide = widening(src)
    extra = merged_intermediate_size(src) - facts.expert_intermediate_size
    shared_width, shared_wide = merged_shared_layout(src)[0], shared_widening(src)
    for name, tensor in non_expert_tensors(src.base, fam):
        target = fam.rename(name)
        if target in trained:
            tensor = trained.pop(target)
        else:
            if target in src.nf4_linears:
                tensor = nf4_round_trip(tensor)
            if target in deltas:
                tensor = tensor.float() + _lora_delta(deltas.pop(target).lora, 0)
        shared = fam.shared_expert_proj(name) if shared_width else None
        if shared is not None:  # the ungated shared expert, widened by the adapter and / or padded with zeros
            layer, proj = shared
            rows_g, rows_u, cols_d = shared_wide.get(layer, (None, None, None))
            pad = shared_width - tensor.shape[0 if proj != "down" else 1]
            if proj == "down":
                tensor = _widen_rows(tensor.float().T, None if cols_d is None else cols_d.T, pad).T.contiguous()
            else:
                tensor = _widen_rows(tensor.float(), rows_g if proj == "gate" else rows_u, pad)
        yield name, fam.widen_non_expert(name, tensor, extra, src.hf_config)  # zeros for the added units
    left = sorted(trained) + sorted(deltas)
    if left:
        raise ExportError(f"{src.base}: the checkpoint has no tensor for {left[:3]}, which the run trained; "
                          "is it the checkpoint the run was trained on?")

    stores = expert_stores(src)

    def layer_experts(layer: int) -> Iterator[dict[str, torch.Tensor]]:
        """One layer's merged experts, one at a time (canonical gate / up / down)."""
        bank = src.peft.banks.get(layer)
        inside = bank.inside if bank is not None and bank.inside is not None else None
        for e in range(facts.num_experts):
            w = expert_weights(src, stores, layer, e)
            if inside is not None:
                w = {p: w[p] + _lora_delta(inside[p], e) for p in w}
            rows_g, rows_u, cols_d = wide[layer][e] if layer in wide else (None, None, None)
            w["gate"], w["up"] = _widen_rows(w["gate"], rows_g, extra), _widen_rows(w["up"], rows_u, extra)
            w["down"] = _widen_rows(w["down"].T, None if cols_d is None else cols_d.T, extra).T.contiguous()
            yield w

    for layer in facts.moe_layers:  # in the hub's layout: per-expert tensors, or fused ones (gpt-oss)
        yield from fam.expert_checkpoint_tensors(layer, layer_experts(layer))


def _lora_delta(bank, idx: int) -> torch.Tensor:
    """(alpha/r)·B·A of one LoRA adapter of a bank, [out, in] in fp32."""
    return (bank.up[idx].float() @ bank.down[idx].float()) * bank.scale


def _widen_rows(w: torch.Tensor, rows: torch.Tensor | None, extra: int) -> torch.Tensor:
    """w [I, H] with `rows` appended, then zero rows up to I + extra."""
    parts = [w] if rows is None else [w, rows]
    have = sum(p.shape[0] for p in parts) - w.shape[0]
    if extra > have:
        parts.append(torch.zeros(extra - have, w.shape[1], dtype=w.dtype))
    return torch.cat(parts, dim=0) if len(parts) > 1 else w


# ---- writing ----------------------------------------------------------------------------------------------


def write_merged(src: RunSource, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write the merged model to `out_dir` (safetensors shards, config.json, tokenizer files); returns a summary.

    `out_dir` should be a fresh folder: the export stages into one and moves the files when all are written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, max_shard_bytes)
    dtype_name = str(dtype).removeprefix("torch.")
    for name, tensor in merged_tensors(src):
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
            require_finite(name, tensor, dtype_name)
        writer.add(name, tensor)
    files = writer.close()

    config = json.loads((src.base / "config.json").read_text())
    inter = merged_intermediate_size(src)
    section = src.family.config_json_section(config)  # a multimodal config's text_config
    section[src.family.expert_intermediate_key] = inter
    section.update(merged_shared_layout(src)[1])
    if section.get("num_nextn_predict_layers"):  # the base's Multi-Token-Prediction layers are not merged or written
        section["num_nextn_predict_layers"] = 0
    config["dtype"] = dtype_name
    config.pop("quantization_config", None)  # e.g. gpt-oss's MXFP4 release: the merge is written in plain floats
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files.append("config.json")
    for name in COPIED_FILES:
        if (src.base / name).is_file():
            shutil.copyfile(src.base / name, out_dir / name)
            files.append(name)
    return {"files": files, "expert_intermediate_size": {"base": src.facts.expert_intermediate_size,
                                                         "merged": inter}}


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes`, named as transformers names them."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names, _ in self.shards):
            raise ExportError(f"tensor {name!r} appears twice in the merged model.")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards, and the index when there are several; returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors, _) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": sum(b for _, _, b in self.shards)}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names + ["model.safetensors.index.json"]
