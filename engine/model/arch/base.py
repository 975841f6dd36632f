"""What every MoE family module tells the engine: where the MoE blocks are, their facts, and
how checkpoint tensor names map onto the canonical per-expert layout (gate / up / down). Their llama.cpp side (GGUF
names and hyperparameters) is the `GGUFMap` mixin of _gguf.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ...releases import PUBLISHED_DIR
# llama.cpp's side of a family, and the names every family module takes from here
from ._gguf import DENSE_AND_SHARED_FFN_TENSORS, GGUF_TENSOR_NAMES, GT, GGUFMap  # noqa: F401

#: The three projections of one expert, in the canonical layout (nn.Linear weights):
#: gate [I, H], up [I, H], down [H, I].
PROJECTIONS = ("gate", "up", "down")
#: bits per parameter of NF4 with double quantisation (4 bits + blockwise absmax scales)
NF4_BITS = 4.13


@dataclass(frozen=True)
class MoEFacts:
    """The MoE facts of one model config, the same names for every family."""

    family: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    activation: str
    shared_expert_intermediate_size: int = 0  # 0: no shared expert

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_params(self) -> int:
        """Parameters of all routed experts (shared experts not included)."""
        return self.params_per_expert * self.num_experts * len(self.moe_layers)


@dataclass(frozen=True)
class ExpertKey:
    """A checkpoint tensor that holds one projection of one expert."""

    layer: int
    expert: int
    proj: str  # one of PROJECTIONS


class Family(GGUFMap):
    """Base of a model family. Subclasses set the class attributes and override what differs."""

    model_type: str = ""
    title: str = ""
    examples: tuple[str, ...] = ()
    #: attribute of a decoder layer that holds the MoE block (transformers 5.x names)
    block_attr: str = "mlp"
    #: attribute of the MoE block that holds its router
    router_attr: str = "gate"
    #: attribute of the base model (`model.model`) holding the norm between the last decoder layer and the head
    final_norm_attr: str = "norm"
    #: hub checkpoint name of one expert projection
    expert_key_template: str = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    #: checkpoint projection name -> canonical projection
    proj_names: dict[str, str] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    #: config.json key holding the routed experts' intermediate size (the merge export widens it)
    expert_intermediate_key: str = "intermediate_size"
    #: plain renames applied to non-expert checkpoint names (hub name fragment -> transformers 5 fragment)
    renames: dict[str, str] = {}
    #: how hub checkpoints name the experts when not by `expert_key_template` (shown by `moetune models`)
    hub_expert_names: str = ""
    #: names (with {layer}) of the hub tensors holding one layer's experts fused in transformers' own order,
    #: gate_up [E, 2I, H] (gate rows, then up) and down [E, H, I], under names of the hub's own (Granite's
    #: input_linear / output_linear, Gemma 4's multimodal ones); empty: per-expert names, or a family's own hooks
    hub_fused_experts: tuple[str, str] | tuple[()] = ()
    #: whether hub checkpoints name each expert's projections: the `peft` export then writes per-expert LoRA, which
    #: PEFT converts onto the fused experts (and llama.cpp's convert_lora_to_gguf.py reads); False (experts fused per
    #: layer: gpt-oss, granitemoe): it writes PEFT's fused `target_parameters` tensors (engine/export/peft_lora.py)
    peft_per_expert: bool = True
    #: the experts module's fused tensors are [E, in, out] (transformers' `use_experts_implementation(
    #: is_transposed=True)`, which PEFT's target_parameters LoRA reads too), not [E, out, in]
    experts_transposed: bool = False
    #: file stem in engine/arch/published/ holding the config.json of the family's flagship release
    published: str = ""
    #: attention linear layers attention LoRA wraps (those a layer has; MLA has its own projections)
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: how the router scores experts: "softmax" (over all experts) or "sigmoid" (each expert on its own);
    #: the balance loss reads the scores as the router computes them (`router_probs`)
    router_scoring: str = "softmax"
    #: the shared expert is a plain MLP added with weight 1 (no gate): adapters beside the MoE block merge into it
    shared_expert_ungated: bool = False
    #: model_type of the language model's own config inside a multimodal checkpoint's (Qwen3.5: qwen3_5_moe_text)
    text_model_type: str = ""

    # ---- facts -------------------------------------------------------------------------------
    def num_experts(self, cfg: Any) -> int:
        return int(cfg.num_experts)

    def expert_intermediate_size(self, cfg: Any) -> int:
        return int(getattr(cfg, self.expert_intermediate_key))

    def norm_topk_prob(self, cfg: Any) -> bool:
        return bool(getattr(cfg, "norm_topk_prob", False))

    def shared_expert_intermediate_size(self, cfg: Any) -> int:
        return 0

    def activation(self, cfg: Any) -> str:
        """The experts' activation (configs without `hidden_act` name it in their family module)."""
        return str(cfg.hidden_act)

    def moe_layers(self, cfg: Any) -> tuple[int, ...]:
        return tuple(range(int(cfg.num_hidden_layers)))

    def facts(self, cfg: Any) -> MoEFacts:
        """The MoE facts of a transformers config of this family."""
        return MoEFacts(
            family=self.model_type,
            num_layers=int(cfg.num_hidden_layers),
            moe_layers=self.moe_layers(cfg),
            num_experts=self.num_experts(cfg),
            top_k=int(cfg.num_experts_per_tok),
            hidden_size=int(cfg.hidden_size),
            expert_intermediate_size=self.expert_intermediate_size(cfg),
            norm_topk_prob=self.norm_topk_prob(cfg),
            activation=self.activation(cfg),
            shared_expert_intermediate_size=self.shared_expert_intermediate_size(cfg),
        )

    def published_config(self):
        """The transformers config of the family's flagship release, from the published values."""
        return self.model_config(config_from_file(PUBLISHED_DIR / f"{self.published}.json"))

    def model_config(self, cfg: Any) -> Any:
        """The config MoETune builds the language model from (a multimodal checkpoint's text config)."""
        return cfg

    def config_json_section(self, raw: dict) -> dict:
        """The part of a checkpoint's config.json that holds the language model's keys (edited by merges)."""
        return raw

    def skip_tensor(self, name: str, cfg: Any) -> bool:
        """Whether a checkpoint tensor is outside the language model MoETune trains (MTP layers, a vision tower):
        loading and GGUF skip it; the hf export copies a vision tower's unchanged and drops MTP layers."""
        return self.is_mtp_tensor(name, cfg)

    def tiny_config_kwargs(self, layers: int, hidden: int, experts: int, top_k: int, vocab: int) -> dict:
        """Keyword arguments for this family's transformers config class at a tiny size."""
        raise NotImplementedError

    # ---- modules -----------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a model of this family (`decoder_layers`, unless it nests them elsewhere)."""
        return decoder_layers(model)

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """Yield (layer index, MoE block) for every decoder layer that has routed experts."""
        for i, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.block_attr)
            if hasattr(block, "experts") and hasattr(block, self.router_attr):
                yield i, block

    def router(self, block: nn.Module) -> nn.Module:
        """The block's router: a module with a `weight` [E, H] that returns (logits, gates, indices)."""
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        """The block's experts module (fused `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])."""
        return block.experts

    def experts_name(self, layer: int) -> str:
        """The module-tree name of one layer's fused experts module (its `gate_up_proj` / `down_proj` beneath)."""
        return f"model.layers.{layer}.{self.block_attr}.experts"

    def fused_experts_regex(self) -> re.Pattern:
        """Matches a fused experts tensor's module-tree name: groups (layer, `gate_up_proj` | `down_proj`)."""
        return re.compile(re.escape(self.experts_name(0)).replace(r"\.0\.", r"\.(\d+)\.", 1) +
                          r"\.(gate_up_proj|down_proj)")

    def shared_expert(self, block: nn.Module) -> nn.Module | None:
        """The always-on shared expert of the block, if the family has one."""
        return None

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-token expert probabilities [T, E] from the router's logits, for the balance loss and statistics:
        softmax for a softmax router; a sigmoid router's scores normalised to sum to 1 (DeepSeek-V3's
        sequence-wise balance loss uses the same normalised affinities)."""
        if self.router_scoring == "sigmoid":
            scores = torch.sigmoid(logits.float())
            return scores / scores.sum(dim=-1, keepdim=True)
        return torch.softmax(logits.float(), dim=-1)

    def topk_gate_sum(self, cfg: Any) -> float | None:
        """What every token's top-k gates sum to when that is one constant (1.0 when renormalised), else None."""
        return 1.0 if self.norm_topk_prob(cfg) else None

    def router_note(self, cfg: Any) -> str:
        """What the routing statistics and balance losses mean for this family's router (one line)."""
        return ("softmax router: balance loss = E · Σ_e f_e · P_e over all MoE layers (transformers' "
                "load_balancing_loss_func; P_e the mean softmax probability; k when balanced)")

    def attention_shape(self, cfg: Any) -> tuple[int, int, int]:
        """(query heads, key/value heads, head_dim) of the attention the planner sizes (MLA: qk_head_dim)."""
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "qk_head_dim", None) or getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        return heads, int(getattr(cfg, "num_key_value_heads", None) or heads), int(head_dim)

    def attention_modules(self, attn: nn.Module) -> list[str]:
        """Names of the attention linear layers this decoder layer's attention has (of `attention_projections`)."""
        return [n for n in self.attention_projections if isinstance(getattr(attn, n, None), nn.Module)]

    def shared_expert_proj(self, name: str) -> tuple[int, str] | None:
        """(layer, canonical projection) when a checkpoint tensor is a projection of an ungated shared expert."""
        return None

    def shared_expert_layout(self, cfg: Any, expert_intermediate: int, extra: int) -> tuple[int, dict]:
        """(width, config.json edits) of the ungated shared expert after a merge that makes the routed experts
        `expert_intermediate` wide and needs `extra` more shared columns."""
        raise NotImplementedError(f"{self.title} has no ungated shared expert to merge into")

    def is_mtp_tensor(self, name: str, cfg: Any = None) -> bool:
        """Whether a checkpoint tensor belongs to a Multi-Token-Prediction layer, which transformers' model does not
        build: MoETune skips it when loading and exporting. Default: the `num_nextn_predict_layers` layers past
        `num_hidden_layers` (DeepSeek-V3, GLM-4.5)."""
        extra = int(getattr(cfg, "num_nextn_predict_layers", 0) or 0) if cfg is not None else 0
        m = re.match(r"model\.layers\.(\d+)\.", name) if extra else None
        return m is not None and int(cfg.num_hidden_layers) <= int(m[1]) < int(cfg.num_hidden_layers) + extra

    def tiny_model(self, config: Any) -> nn.Module:
        """The randomly initialised model a tiny checkpoint is saved from (the hub's class: a multimodal one for a
        multimodal family)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def expert_views(self, block: nn.Module, expert: int) -> dict[str, torch.Tensor]:
        """Per-expert gate [I, H], up [I, H], down [H, I] as views into the fused tensors."""
        experts = self.experts(block)
        return {proj: self.fused_view(getattr(experts, attr), attr, expert, proj)
                for proj, attr in (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj"))}

    def fused_view(self, fused: torch.Tensor, attr: str, expert: int, proj: str) -> torch.Tensor:
        """The canonical [out, in] view of one expert's projection inside the module's fused tensor `attr`
        (`gate_up_proj` [E, 2I, H]: gate rows then up rows; `down_proj` [E, H, I])."""
        rows = fused[expert]
        if attr == "gate_up_proj":
            inter = rows.shape[0] // 2
            return rows[:inter] if proj == "gate" else rows[inter:]
        return rows

    # ---- the experts' own form (defaults: act(gate)·up with hidden_act, no biases, fused [E, 2I, H]) -----
    def expert_glu(self, cfg: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The experts' gated activation (gate, up) -> hidden when it is not `act(gate) · up` (None: it is)."""
        return None

    def canonical_experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of a loaded block as gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I]."""
        experts = self.experts(block)
        return experts.gate_up_proj, experts.down_proj

    def expert_gate_scale_name(self, layer: int) -> str | None:
        """The checkpoint tensor [E] of per-expert factors a layer's router multiplies its (renormalised) top-k gates
        by (None: it has none); a merge that adds one adapter to every expert divides each expert's copy by its own."""
        return None

    def expert_biases(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The experts' biases in the canonical order, gate_up [E, 2I] and down [E, H]; None: they have none."""
        return None

    def raw_expert_layer(self, name: str) -> int | None:
        """The layer of a hub tensor holding experts in a form `convert_stream` rewrites (None: not one)."""
        hit = self._hub_fused_part(name)
        return None if hit is None else hit[0]

    def convert_stream(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Hub checkpoint tensors with experts in a family-specific form (`hub_fused_experts`, or e.g. MXFP4 blocks
        in a family's own override) rewritten as per-expert canonical projections under `expert_key_template`; the
        rest unchanged."""
        return self._split_hub_fused(tensors) if self.hub_fused_experts else iter(tensors)

    def expert_checkpoint_tensors(self, layer: int, experts: Iterable[dict[str, torch.Tensor]]
                                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """(hub name, tensor) of one layer's experts (canonical gate / up / down) in the hub's layout: expert by
        expert, or fused under `hub_fused_experts`."""
        if self.hub_fused_experts:
            experts = list(experts)
            gate_up = torch.stack([torch.cat([w["gate"], w["up"]]) for w in experts])
            down = torch.stack([w["down"] for w in experts])
            for template, tensor in zip(self.hub_fused_experts, (gate_up, down)):
                yield template.format(layer=layer), tensor
            return
        for e, w in enumerate(experts):
            for proj in PROJECTIONS:
                yield self.expert_key_name(ExpertKey(layer, e, proj)), w[proj]

    def _hub_fused_part(self, name: str) -> tuple[int, str] | None:
        """(layer, "gate_up" | "down") when `name` is one of `hub_fused_experts`."""
        for part, template in zip(("gate_up", "down"), self.hub_fused_experts):
            head, _, tail = template.partition("{layer}")
            middle = name[len(head):len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
            if middle.isdigit():
                return int(middle), part
        return None

    def _split_hub_fused(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """`hub_fused_experts` tensors — gate_up [E, 2I, H] (gate rows, then up), down [E, H, I] — split expert by
        expert into canonical projections; other tensors as they are."""
        for name, t in tensors:
            hit = self._hub_fused_part(name)
            if hit is None:
                yield name, t
                continue
            layer, part = hit
            for e in range(t.shape[0]):
                if part == "down":
                    yield self.expert_key_name(ExpertKey(layer, e, "down")), t[e]
                else:
                    inter = t.shape[1] // 2
                    yield self.expert_key_name(ExpertKey(layer, e, "gate")), t[e, :inter]
                    yield self.expert_key_name(ExpertKey(layer, e, "up")), t[e, inter:]

    def widen_non_expert(self, name: str, tensor: torch.Tensor, extra: int, cfg: Any = None) -> torch.Tensor:
        """A non-expert hub tensor of a model with config `cfg` after the experts are widened by `extra` units
        (expert biases, shared experts sized by the experts' width get zeros for them)."""
        return tensor

    def gguf_stream(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors as the GGUF export maps them (default: as they are)."""
        return iter(tensors)

    def tiny_init(self, model: nn.Module, generator: torch.Generator) -> None:
        """Give a tiny random model's zero-initialised tensors that matter (expert biases...) random values."""

    # ---- checkpoint names ---------------------------------------------------------------------
    def parse_expert_key(self, name: str) -> ExpertKey | None:
        """The expert projection a checkpoint tensor holds, or None for a non-expert tensor."""
        m = self._expert_key_regex().fullmatch(name)
        if m is None:
            return None
        return ExpertKey(int(m["layer"]), int(m["expert"]), self.proj_names[m["proj"]])

    def peft_name(self, name: str) -> str:
        """The weight name a PEFT-layout LoRA calls a checkpoint tensor by (the hub's, unless the model users load
        it onto names it otherwise)."""
        return name

    def peft_module(self, name: str) -> str:
        """A module-tree name as the model PEFT users load calls it (transformers' class for the hub's config.json;
        default: the same)."""
        return name

    def expert_key_name(self, key: ExpertKey) -> str:
        """The hub checkpoint name of one expert projection (inverse of parse_expert_key)."""
        hub = {canon: hub for hub, canon in self.proj_names.items()}[key.proj]
        return self.expert_key_template.format(layer=key.layer, expert=key.expert, proj=hub)

    def _expert_key_regex(self) -> re.Pattern:
        projs = "|".join(map(re.escape, self.proj_names))
        pattern = re.escape(self.expert_key_template)
        for field, group in (("layer", r"(?P<layer>\d+)"), ("expert", r"(?P<expert>\d+)"), ("proj", f"(?P<proj>{projs})")):
            pattern = pattern.replace(re.escape("{" + field + "}"), group)
        return re.compile(pattern)

    def rename(self, name: str) -> str:
        """A non-expert checkpoint name as the transformers 5.x module tree calls it."""
        for old, new in self.renames.items():
            name = name.replace(old, new)
        return name


def config_from_file(path: Path):
    """A transformers config from a config.json, with no weights and no download."""
    from transformers import AutoConfig

    raw = json.loads(Path(path).read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM model."""
    return model.model.layers
