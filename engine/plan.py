"""The memory planner (DESIGN "Memory"): from a config and a GPU budget, before any weight loads, the
bytes of every item on the GPU, where each MoE layer's experts live, and whether it fits.

The model config comes from `model.path`'s config.json only: the module tree is built on the meta
device (no memory, no weights), so every non-expert weight is counted from the real architecture.

Units: 1 GB = 10^9 bytes everywhere, `memory.gpu_gb` included (a "24 GB" card holds 24 GiB = 25.8 GB).

What the GPU holds, placed in this order:
1. non-expert weights, bf16 (2 bytes): embeddings, lm_head, norms, biases, routers (the MoE's and
   Qwen2-MoE's shared-expert gate); attention q/k/v/o and the other linear layers (Qwen2-MoE's shared
   expert, dense MLPs) in NF4 when `model.attention_quant: nf4` (what `engine.model.linear4bit.quantize_linear_layers`
   swaps), else bf16.
2. adapters: trainable parameters from a closed form per strategy (`adapter_params`), 16 bytes each:
   fp32 parameter + fp32 gradient + AdamW's two fp32 moments (`adapters` 4 B, `optimizer` 12 B).
3. activations at `train.micro_batch` × `data.max_len` tokens (`activation_bytes`): with gradient
   checkpointing, each decoder layer's input hidden state is kept; one layer's full activations are
   alive at a time while it is recomputed and back-propagated (×2: the saved tensors and their
   gradients); the logits with their fp32 upcast and gradient (10 bytes a logit). Attention is assumed
   to run through SDPA/flash kernels (no T×T score matrix). When the experts are offloaded the trainer
   runs the layer-major step, which keeps every layer's input for all `train.grad_accum` micro-batches
   until its backward sweep: counted as such (`layer_inputs` × grad_accum, plus what each micro-batch
   carries), so lowering micro_batch while raising grad_accum frees nothing of it.
4. dequantised weights in flight: one group of experts in bf16 (the expert bank dequantises a layer's
   touched experts in groups of `engine.model.expert_bank.group_size` — a quarter of the layer or 32 MiB, at most
   256 MiB, at least one expert — and recomputes in backward), plus the largest NF4 linear layer when
   attention is NF4.
5. a fixed reserve of `CUDA_RESERVE` bytes for the CUDA context, cuBLAS workspaces and allocator slack.
6. experts (NF4 with double quantisation: `engine.model.stores.nf4_nbytes`, ≈ 4.13 bits a weight; or bf16):
   all of them *resident* when they fit; otherwise an expert cache of what is left. The schedule runs
   forward over layers 0..L-1 and backward L-1..0, so the cache keeps the last layers at the end of
   the forward (they are labelled *cached*) and the rest are *offloaded*: pinned host memory, copied
   over PCIe once in the forward and once in the backward of every step (with `engine.training.steps`,
   once per step whatever `train.grad_accum` is). A cache of S layers moves 2·(L−S) layers a step in
   steady state. Offloading needs a cache of at least `STREAM_LAYERS` layers (the layer computing
   and the next one being prefetched).

Several GPUs (`--gpus N`, default `train.expert_parallel`): every figure is one GPU's. Data parallel (each GPU
holds everything) plans as one GPU. With `train.expert_parallel: P` each GPU holds E/P of every layer's experts
and of the embedded strategy's per-expert adapters (with their optimizer state), everything else replicated,
plus the buffers of the token exchange (the routed pairs' inputs sent and received, their outputs back);
items 4 and 6 count E/P experts a layer. The plan assumes balanced routing: a layer whose tokens crowd on one
GPU's experts needs more activations there. `all_to_all_bytes_per_step` estimates what one GPU sends to the
others a step (inputs there, outputs back, in the forward, the backward and the checkpointed recompute).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .plan_advice import advice
from .sizes import (
    BF16, GB, PCIE_BYTES_PER_S, QUANTIZABLE_GROUPS, ModelShape, activation_bytes, adapter_params,
    adapter_params_per_gpu, all_to_all_bytes, fmt_gb, host_layer_bytes, model_shape,
)

#: CUDA context (~0.5 GB on recent drivers), cuBLAS/cuDNN workspaces and caching-allocator slack
CUDA_RESERVE = 1 * GB
#: host memory an offloading run needs beyond its pinned experts (and the layer being pinned): the OS, Python,
#: torch and CUDA's host allocations, the checkpoint tensors in flight while streaming (an estimate, not measured)
HOST_RESERVE = 6 * GB
#: fp32 parameter + fp32 gradient + two fp32 AdamW moments
PARAM_BYTES, OPTIMIZER_BYTES = 4, 12
#: layers of experts an offloading cache holds at least: the one computing and the next, prefetched
STREAM_LAYERS = 2
#: budget used when memory.gpu_gb is null and no GPU is visible
DEFAULT_GPU_GB = 24.0
PLACEMENTS = ("resident", "cached", "offloaded")


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class Plan:
    """What goes where on the GPU for one config and budget, and whether it fits."""

    model: str
    family: str
    budget_bytes: int
    budget_source: str
    #: GPU bytes by item, in placement order (non_expert_weights … experts)
    gpu: dict[str, int]
    #: details: non-expert weights by group, activations by part, trainable parameters by group
    non_expert: dict[str, int]
    activations: dict[str, int]
    trainable_params: dict[str, int]
    expert_bytes: int  # one expert, as stored
    expert_layer_bytes: int  # one MoE layer's experts, as stored (one GPU's share under expert parallelism)
    experts_total_bytes: int
    #: MoE layer -> "resident" | "cached" | "offloaded"
    placement: dict[int, str]
    cache_slots: int  # experts the GPU cache holds when offloading (0: everything resident)
    host_pinned_bytes: int  # experts kept in pinned host memory
    pcie_bytes_per_step: int
    pcie_seconds_per_step: float
    fits: bool
    gpus: int = 1  # GPUs of the job; every figure above is one GPU's
    expert_parallel: int = 1  # train.expert_parallel: each GPU holds 1/expert_parallel of every layer's experts
    experts_per_gpu_bytes: int = 0  # what one GPU holds of the experts (resident, cached or in its host memory)
    all_to_all_bytes_per_step: int = 0  # what one GPU sends to the others a step in the token exchange
    #: offloading: host RAM the run needs (pinned experts + one layer being pinned + HOST_RESERVE), and the
    #: machine's (or --host-gb); a plan whose host RAM is short does not fit
    host_ram_needed_bytes: int = 0
    host_ram_bytes: int = 0
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu_total(self) -> int:
        """Bytes the plan puts on the GPU."""
        return sum(self.gpu.values())

    def layers(self, placement: str) -> list[int]:
        """MoE layers with the given placement."""
        return [layer for layer, p in self.placement.items() if p == placement]

    def to_dict(self) -> dict:
        """Plain, JSON-ready numbers (layer keys as strings)."""
        d = asdict(self)
        d["placement"] = {str(k): v for k, v in self.placement.items()}
        d["gpu_total"] = self.gpu_total
        return d

    def summary(self) -> str:
        """A readable account of the plan."""
        s = self.settings
        lines = [f"MoETune plan: {self.model} ({self.family}), {s['moe_layers']} MoE layers × {s['num_experts']} "
                 f"experts, top-{s['top_k']}",
                 f"GPU budget {fmt_gb(self.budget_bytes)} ({self.budget_source}); 1 GB = 10^9 bytes"]
        if self.gpus > 1 or self.expert_parallel > 1:
            share = (f"expert parallel {self.expert_parallel}: each GPU holds {s['num_experts'] // self.expert_parallel}"
                     f" of every layer's {s['num_experts']} experts" if self.expert_parallel > 1
                     else "data parallel: each GPU holds every expert")
            lines.append(f"{self.gpus} GPUs, figures per GPU; {share}")
        lines.append("")
        trainable = sum(self.trainable_params.values())
        attn = "NF4" if s["attention_quant"] == "nf4" else "bf16"
        labels = {
            "non_expert_weights": f"non-expert weights (attention {attn})",
            "adapters": f"adapters ({trainable / 1e6:.2f} M params, fp32)",
            "optimizer": "gradients + AdamW moments (fp32)",
            "activations": (f"activations ({s['grad_accum']} × {s['micro_batch']} × {s['max_len']} tokens, "
                            "layer-major)" if s.get("layer_major") else
                            f"activations ({s['micro_batch']} × {s['max_len']} tokens"
                            f"{', checkpointed' if s['gradient_checkpointing'] else ''})"),
            "dequant_workspace": "dequantised weights in flight",
            "cuda_reserve": "CUDA context / workspace reserve",
            "experts": (f"experts {s['quant'].upper()}, all resident"
                        + (f" (1/{self.expert_parallel} of them)" if self.expert_parallel > 1 else "")
                        if all(v == "resident" for v in self.placement.values())
                        else f"expert cache ({self.cache_slots} experts)"),
        }
        for key, value in self.gpu.items():
            lines.append(f"  {labels.get(key, key):<48} {fmt_gb(value):>9}")
        host_short = self.host_ram_needed_bytes > self.host_ram_bytes
        verdict = ("fits" if self.fits else "fits the GPU, but host RAM is short: DOES NOT FIT"
                   if host_short and self.gpu_total <= self.budget_bytes else "DOES NOT FIT")
        lines.append(f"  {'total':<48} {fmt_gb(self.gpu_total):>9}  of {fmt_gb(self.budget_bytes)}: {verdict}")
        lines.append("")
        if self.expert_parallel > 1:
            lines.append(f"experts: {fmt_gb(self.experts_total_bytes)} in all, {fmt_gb(self.experts_per_gpu_bytes)} on each "
                         f"GPU ({_mb(self.expert_layer_bytes)} a layer), {_mb(self.expert_bytes)} an expert "
                         f"({s['quant']})")
        else:
            lines.append(f"experts: {fmt_gb(self.experts_total_bytes)} in all, {_mb(self.expert_layer_bytes)} a layer, "
                         f"{_mb(self.expert_bytes)} an expert ({s['quant']})")
        for p in PLACEMENTS:
            if self.layers(p):
                lines.append(f"  {p:<10} layers {_ranges(self.layers(p))}")
        if self.pcie_bytes_per_step:
            lines.append(f"PCIe per step: {fmt_gb(self.pcie_bytes_per_step)} ({len(self.layers('offloaded'))} "
                         f"layers × {_mb(self.expert_layer_bytes)}, forward + backward) "
                         f"≈ {self.pcie_seconds_per_step:.2f} s at {PCIE_BYTES_PER_S / GB:.0f} GB/s; "
                         f"pinned host memory {fmt_gb(self.host_pinned_bytes)}")
            lines.append(f"host RAM: needs ≈ {fmt_gb(self.host_ram_needed_bytes)} of {fmt_gb(self.host_ram_bytes)}"
                         + ("" if self.host_ram_needed_bytes <= self.host_ram_bytes else ": NOT ENOUGH"))
        else:
            lines.append("PCIe per step: none (no expert is offloaded)")
        if self.expert_parallel > 1:
            lines.append(f"all-to-all per step: ≈ {fmt_gb(self.all_to_all_bytes_per_step)} sent by each GPU (routed "
                         "tokens to their experts' GPU and back, forward, backward and recompute)")
        if self.advice:
            lines.append("")
            lines.append("advice:" if self.fits else "to make it fit:")
            lines.extend(f"  - {a}" for a in self.advice)
        return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(out)


def _budget(cfg: Config, gpu_gb: float | None) -> tuple[int, str]:
    if gpu_gb is not None:
        if gpu_gb <= 0:
            raise ConfigError(f"--gpu-gb: {gpu_gb} must be a positive number of GB.")
        return int(gpu_gb * GB), "--gpu-gb"
    if cfg.memory.gpu_gb is not None:
        return int(cfg.memory.gpu_gb * GB), "memory.gpu_gb"
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(free), "the GPU's free memory"
    except Exception:  # no usable driver: plan for the default card
        pass
    return int(DEFAULT_GPU_GB * GB), f"no GPU visible and memory.gpu_gb is null: a {DEFAULT_GPU_GB:.0f} GB card"


def _sizes(cfg: Config, shape: ModelShape, layer_major: bool = False) -> dict:
    """Everything but the experts' placement; `layer_major`: the activations of the offloaded (layer-major) step."""
    from .model import nf4_expert_nbytes, nf4_nbytes
    from .model.stores import CODE_TABLE_BYTES
    from .model.expert_bank import group_size

    H, I, E = shape.facts.hidden_size, shape.facts.expert_intermediate_size, shape.facts.num_experts
    nf4_attn = cfg.model.attention_quant == "nf4"
    non_expert = {}
    for group, n in shape.params.items():
        if group in QUANTIZABLE_GROUPS and nf4_attn:
            non_expert[group] = sum(nf4_nbytes(x) + CODE_TABLE_BYTES for x in shape.linear_numels[group])
        else:
            non_expert[group] = n * BF16
    trainable = adapter_params(cfg, shape)
    params = adapter_params_per_gpu(cfg, shape)
    acts = activation_bytes(cfg, shape, layer_major)
    local = E // cfg.train.expert_parallel  # experts of a layer on one GPU
    if cfg.model.quant == "nf4":
        expert = nf4_expert_nbytes(H, I)
        layer, layer_full = local * expert + CODE_TABLE_BYTES, E * expert + CODE_TABLE_BYTES
        workspace = group_size(local, H, I, BF16) * 3 * H * I * BF16  # the experts one grouped pass dequantises
    else:
        expert = 3 * H * I * BF16
        layer, layer_full = local * expert, E * expert
        workspace = 0
    if nf4_attn:
        workspace += max((x for g in QUANTIZABLE_GROUPS for x in shape.linear_numels[g]), default=0) * BF16
    fixed = {"non_expert_weights": sum(non_expert.values()), "adapters": params * PARAM_BYTES,
             "optimizer": params * OPTIMIZER_BYTES, "activations": sum(acts.values()),
             "dequant_workspace": workspace, "cuda_reserve": CUDA_RESERVE}
    return {"non_expert": non_expert, "trainable": trainable, "acts": acts, "expert": expert, "layer": layer,
            "layer_full": layer_full, "local": local, "fixed": fixed, "layer_major": layer_major,
            "host_layer": host_layer_bytes(cfg, shape, local)}


def _place(cfg: Config, shape: ModelShape, budget: int) -> dict:
    # Offloaded experts train layer-major (engine.training.steps), which keeps every layer's input for all
    # grad_accum micro-batches until the backward sweep. We count that (activation_bytes(layer_major=True))
    # rather than keep less by parking the saved inputs in pinned host memory: that would send
    # 2 · L · grad_accum · tokens · H · 2 bytes a step over the PCIe link the experts stream on (Mixtral's 24 GB
    # preset: 2.1 GB), about what the honest count costs in expert traffic (its 1.1 GB leave ≈ 1.5 layers fewer
    # cached: +2.2 GB a step), and it would add a copy and a wait per layer and micro-batch to the hot loop.
    # So the plan counts what the step keeps, and the expert cache gives way.
    resident = _sizes(cfg, shape, layer_major=cfg.memory.offload == "on")
    s = resident
    moe, E = list(shape.facts.moe_layers), s["local"]  # E: the experts of a layer this GPU holds
    layer, expert = s["layer"], s["expert"]
    total = len(moe) * layer
    left = budget - sum(s["fixed"].values())
    streamed = s if s["layer_major"] else _sizes(cfg, shape, layer_major=True)
    if left >= total:
        placement = dict.fromkeys(moe, "resident")
        slots, cached, fits, gpu_experts = 0, len(moe), True, total
    else:
        s = streamed  # the experts stream: the layer-major step's activations
        left = budget - sum(s["fixed"].values())
        slots = max(0, min(len(moe) * E - 1, left // expert))
        cached = min(len(moe), slots // E)
        fits = cached >= STREAM_LAYERS
        placement = {l: ("cached" if i >= len(moe) - cached else "offloaded") for i, l in enumerate(moe)}
        gpu_experts = slots * expert
    offloaded = sum(p == "offloaded" for p in placement.values())
    pcie = 2 * offloaded * layer
    host = 0 if all(v == "resident" for v in placement.values()) else len(moe) * s["host_layer"]
    return {**s, "placement": placement, "slots": slots, "fits": fits, "gpu_experts": gpu_experts,
            "total": total, "pcie": pcie, "host": host,
            "need_min": sum(streamed["fixed"].values()) + min(STREAM_LAYERS, len(moe)) * layer,
            "need_all": sum(resident["fixed"].values()) + total}


def plan(cfg: Config, model_config: Any = None, gpu_gb: float | None = None, gpus: int | None = None,
         host_gb: float | None = None) -> Plan:
    """Plan GPU memory for a config: bytes per item, each MoE layer's expert placement, fits or not, advice.

    Reads only `model.path`/config.json (or uses `model_config`); `gpu_gb` overrides `memory.gpu_gb` (one GPU's
    budget); `gpus`: the GPUs of the job (default `train.expert_parallel`), every figure then one GPU's; `host_gb`:
    the host RAM offloaded experts may use (default: this machine's).
    """
    from .config import check_expert_parallel

    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus: {gpus} must be at least 1.")
    stand_in = None
    if model_config is None:
        from .model import read_config

        if not cfg.model.path:
            raise ConfigError("model.path is empty; set it to a local HF checkpoint directory "
                              "(the planner reads only its config.json).")
        stand_in = _published_stand_in(cfg.model.path)
        model_config = stand_in[0] if stand_in else read_config(cfg.model.path)[0]
    shape = model_shape(model_config)
    ep = cfg.train.expert_parallel
    world = gpus if gpus is not None else ep
    check_expert_parallel(ep, world, shape.facts.num_experts)
    budget, source = _budget(cfg, gpu_gb)
    p = _place(cfg, shape, budget)
    gpu = {**p["fixed"], "experts": p["gpu_experts"]}
    result = Plan(
        model=getattr(model_config, "_name_or_path", "") or cfg.model.path or shape.title, family=shape.facts.family,
        budget_bytes=budget, budget_source=source, gpu=gpu, non_expert=p["non_expert"], activations=p["acts"],
        trainable_params=p["trainable"], expert_bytes=p["expert"], expert_layer_bytes=p["layer"],
        experts_total_bytes=len(shape.facts.moe_layers) * p["layer_full"], placement=p["placement"], cache_slots=p["slots"],
        host_pinned_bytes=p["host"], pcie_bytes_per_step=p["pcie"],
        pcie_seconds_per_step=p["pcie"] / PCIE_BYTES_PER_S, fits=p["fits"], gpus=world, expert_parallel=ep,
        experts_per_gpu_bytes=len(shape.facts.moe_layers) * p["layer"],
        all_to_all_bytes_per_step=all_to_all_bytes(cfg, shape),
        notes=[f"1 GB = 10^9 bytes; a 24 GiB card is {24 * 2**30 / GB:.1f} GB",
               f"reserve {fmt_gb(CUDA_RESERVE)} for the CUDA context, workspaces and allocator slack",
               "adapters: fp32 parameter, gradient and two AdamW moments (16 bytes a parameter)",
               "activations: SDPA/flash attention (no T×T scores); gradient checkpointing keeps one input per layer"
               + ("; the layer-major step (offloaded experts) keeps every layer's input for all "
                  f"{cfg.train.grad_accum} micro-batches until its backward sweep" if p["layer_major"] else ""),
               "offloaded layers cross PCIe in the forward and in the backward of each step, "
               f"at {PCIE_BYTES_PER_S / GB:.0f} GB/s; pinned host memory is one exact arena a layer "
               "(engine.model.host_arena), not torch's power-of-two pinned blocks"],
        settings={"quant": cfg.model.quant, "attention_quant": cfg.model.attention_quant,
                  "micro_batch": cfg.train.micro_batch, "max_len": cfg.data.max_len,
                  "gradient_checkpointing": cfg.train.gradient_checkpointing, "moe_layers": len(shape.facts.moe_layers),
                  "grad_accum": cfg.train.grad_accum, "layer_major": p["layer_major"],
                  "num_experts": shape.facts.num_experts, "top_k": shape.facts.top_k, "strategy": cfg.routing.strategy,
                  "adapter_kind": cfg.adapter.kind, "rank": cfg.adapter.rank})
    result.advice = advice(cfg, shape, budget, p, _place, world)
    if p["host"]:
        _check_host_ram(result, shape, host_gb)
    if stand_in:
        result.model = f"{stand_in[1]} (published config; {cfg.model.path} is not there yet)"
        result.notes.insert(0, f"planned from the published config of {stand_in[1]}: the folder {cfg.model.path} "
                               "does not exist yet; put the checkpoint there to train")
    return result


def _check_host_ram(result: Plan, shape: ModelShape, host_gb: float | None) -> None:
    """Offloaded experts live in pinned host memory: count what the run needs there and refuse (fits False, the
    first advice naming both figures) where the machine has less."""
    import os

    if host_gb is not None and host_gb <= 0:
        raise ConfigError(f"--host-gb: {host_gb} must be a positive number of GB.")
    have = int(host_gb * GB) if host_gb is not None else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    layer = result.expert_layer_bytes  # a layer's store is copied into pinned memory one layer at a time
    result.host_ram_needed_bytes, result.host_ram_bytes = result.host_pinned_bytes + layer + HOST_RESERVE, have
    if result.host_ram_needed_bytes > have:
        result.fits = False
        result.advice.insert(0, f"host RAM: the offloaded experts need ≈ {fmt_gb(result.host_ram_needed_bytes)} of host "
                                f"memory ({fmt_gb(result.host_pinned_bytes)} pinned experts, {fmt_gb(layer)} for the layer "
                                f"being pinned, {fmt_gb(HOST_RESERVE)} reserve) and this machine has {fmt_gb(have)}"
                                f"{' (--host-gb)' if host_gb is not None else ''}; train {shape.title} on a machine "
                                f"with at least {math.ceil(result.host_ram_needed_bytes / GB)} GB of RAM.")


def _published_stand_in(path: str) -> tuple[Any, str] | None:
    """(config, name) of a published release when `path` does not exist yet but is named after one
    (e.g. ~/models/Mixtral-8x7B-v0.1, ~/models/gpt-oss-120b), so a preset can be planned before its model is
    downloaded."""
    from .model.arch import config_from_file, get_family
    from .releases import release_named

    folder = Path(path).expanduser()
    release = None if (folder / "config.json").exists() else release_named(folder.name)
    if release is None:
        return None
    raw = config_from_file(release.config)
    return get_family(raw.model_type).model_config(raw), release.name


