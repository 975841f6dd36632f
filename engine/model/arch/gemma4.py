"""Gemma 4 MoE (google/gemma-4-26B-A4B-it: 30 layers, 128 experts of width 704, top-8, beside a dense GELU MLP).

What differs from the other families (transformers 5 `Gemma4TextDecoderLayer` with `enable_moe_block`):
- there is no MoE block module: the decoder layer itself holds `router` and `experts`, and runs them BESIDE its
  dense MLP: dense = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(x))), moe =
  post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(x), router(x))), the layer adding
  post_feedforward_layernorm(dense + moe) to its residual x. MoETune's "block" is `Gemma4MoE`, a view of the
  layer's MoE branch up to the experts' output (before post_feedforward_layernorm_2): adapters beside the block
  read the experts' own (normed) input and add to the experts' output;
- the router (`Gemma4TextRouter`) scores RMSNorm(x) · scale · H^-0.5 with `proj` [E, H] (no bias), softmax over
  all experts, top-k, renormalised, then each gate times the expert's learned `per_expert_scale`: the gates do not
  sum to 1. It returns the probabilities, not logits (`router_probs` takes them as they are);
- the experts are fused per layer in the hub's checkpoint as in transformers (`experts.gate_up_proj` [E, 2I, H],
  `experts.down_proj` [E, H, I]), GELU-tanh (`hidden_activation`);
- the published checkpoint is multimodal (`Gemma4ForConditionalGeneration`): the language model under
  `model.language_model.…`, a vision tower under `model.vision_tower.…` / `model.embed_vision.…`; MoETune trains
  the language model alone (`Gemma4ForCausalLM` from `text_config`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Family, MoEFacts

_MULTIMODAL = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


class Gemma4MoE:
    """The MoE branch of one Gemma 4 decoder layer as MoETune's strategies use a block: `experts` and `peft` live on
    the layer (so the model's state dict names them), forward hooks go on the experts module (its input is the
    normed experts input, its output the weighted experts sum) and follow it when it is replaced (expert
    parallelism swaps in a sharded bank), and calling it runs router and experts on `h`."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.hooks: list[_ExpertsHook] = []

    @property
    def experts(self) -> nn.Module:
        return self.layer.experts

    @experts.setter
    def experts(self, module: nn.Module) -> None:
        for hook in self.hooks:
            hook.handle.remove()
        self.layer.experts = module
        for hook in self.hooks:
            hook.handle = module.register_forward_hook(hook.fn)

    @property
    def peft(self) -> nn.Module:
        try:
            return self.layer.peft
        except AttributeError:
            raise AttributeError("peft") from None

    @peft.setter
    def peft(self, module: nn.Module) -> None:
        self.layer.peft = module

    @property
    def router(self) -> nn.Module:
        return self.layer.router

    def register_forward_hook(self, fn) -> "_ExpertsHook":
        hook = _ExpertsHook(self, fn)
        self.hooks.append(hook)
        return hook

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        _, gates, idx = self.layer.router(flat)
        out = self.layer.experts(self.layer.pre_feedforward_layernorm_2(flat), idx, gates)
        return out.reshape(h.shape)


class _ExpertsHook:
    """A forward hook on the branch's experts module, whichever module that is now (`remove` as torch's handle)."""

    def __init__(self, view: Gemma4MoE, fn):
        self.view, self.fn = view, fn
        self.handle = view.layer.experts.register_forward_hook(fn)

    def remove(self) -> None:
        self.handle.remove()
        if self in self.view.hooks:
            self.view.hooks.remove(self)


#: Gemma4TextRouter subclasses (by base class) that read `proj.weight` as `weight`, as the engine reads a router's
#: scoring matrix (training it, counting it, the balance loss's reference)
_WITH_WEIGHT: dict[type, type] = {}


def _with_weight(router: nn.Module) -> nn.Module:
    """The router, its class swapped once for a subclass with a `weight` property (no new parameter: the state dict
    keeps `router.proj.weight`)."""
    base = type(router)
    if base not in _WITH_WEIGHT.values():
        if base not in _WITH_WEIGHT:
            _WITH_WEIGHT[base] = type(base.__name__, (base,), {"weight": property(lambda self: self.proj.weight)})
        router.__class__ = _WITH_WEIGHT[base]
    return router


def _layer_of(cfg, kind: str):
    """The per-layer config of the first layer of one attention kind (None: the model has none)."""
    i = next((i for i, t in enumerate(cfg.layer_types) if t == kind), None)
    return None if i is None else cfg.per_layer_config[i]


class Gemma4Family(Family):
    model_type = "gemma4"
    text_model_type = "gemma4_text"
    title = "Gemma 4 (MoE)"
    examples = ("google/gemma-4-26B-A4B-it", "google/gemma-4-26B-A4B")
    published = "gemma-4-26B-A4B-it"
    router_attr = "router"
    #: canonical per-expert names only (the hub's experts are fused per layer)
    expert_key_template = "model.language_model.layers.{layer}.experts.{expert}.{proj}.weight"
    hub_fused_experts = ("model.language_model.layers.{layer}.experts.gate_up_proj",
                         "model.language_model.layers.{layer}.experts.down_proj")
    expert_intermediate_key = "moe_intermediate_size"
    renames = {"model.language_model.": "model."}
    peft_per_expert = False
    gguf_arch = "gemma4"
    gguf_missing = ("MoETune's GGUF writer does not write Gemma 4 yet: llama.cpp's 'gemma4' graph reads per-layer-type "
                    "attention (head_count_kv per layer, key/value_length_swa, rope_freqs for the full layers' "
                    "proportional RoPE, the sliding layers' rope base and window pattern, k as v where attention_k_eq_v), "
                    "the router's scale and per_expert_scale (ffn_gate_inp.scale, ffn_down_exps.scale), layer_scalar "
                    "(layer_output_scale), the dense MLP's norms beside the experts' (pre_ffw_norm_2, post_ffw_norm_1/2), "
                    "GELU experts, final logit soft-capping and the 'gemma4' tokenizer model, none of which it writes; "
                    "export --format hf (or peft) and convert that with llama.cpp's convert_hf_to_gguf.py")
    hub_expert_names = ("model.language_model.layers.{layer}.experts.gate_up_proj [E, 2I, H] (gate rows, then up) "
                        "and experts.down_proj [E, H, I]")

    # ---- config --------------------------------------------------------------------------------
    def model_config(self, cfg):
        return cfg.text_config if getattr(cfg, "model_type", "") == self.model_type else cfg

    def config_json_section(self, raw):
        return raw.get("text_config", raw)

    def skip_tensor(self, name, cfg):
        return name.startswith(_MULTIMODAL)

    def peft_module(self, name):
        # transformers loads the hub's config.json as Gemma4ForConditionalGeneration (AutoModelForCausalLM too): the
        # language model under model.language_model, as the checkpoint names it
        return name.replace("model.", "model.language_model.", 1) if name.startswith("model.layers.") else name

    def experts_name(self, layer):
        return f"model.layers.{layer}.experts"

    # ---- facts ---------------------------------------------------------------------------------
    def activation(self, cfg):
        return str(cfg.hidden_activation)

    def norm_topk_prob(self, cfg):
        return True  # renormalised over the top-k, before the per-expert scales

    def topk_gate_sum(self, cfg):
        return 1.0  # renormalised, before the per-expert scales (`expert_gate_scales`, which merges divide out)

    def expert_gate_scale_name(self, layer):
        return f"model.language_model.layers.{layer}.router.per_expert_scale"

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.num_hidden_layers))) if getattr(cfg, "enable_moe_block", False) else ()

    def facts(self, cfg: Any) -> MoEFacts:
        cfg = self.model_config(cfg)  # the multimodal model's config too
        return MoEFacts(family=self.model_type, num_layers=int(cfg.num_hidden_layers), moe_layers=self.moe_layers(cfg),
                        num_experts=self.num_experts(cfg), top_k=int(cfg.top_k_experts),
                        hidden_size=int(cfg.hidden_size), expert_intermediate_size=self.expert_intermediate_size(cfg),
                        norm_topk_prob=True, activation=self.activation(cfg),
                        shared_expert_intermediate_size=self.shared_expert_intermediate_size(cfg))

    def shared_expert_intermediate_size(self, cfg):
        """The dense MLP every layer runs beside its experts (as Granite-4.0-H's shared MLP): always on, added with
        weight 1 (after its own norm); adapters beside the experts do not merge into it (it sits outside their norm)."""
        return int(self.model_config(cfg).intermediate_size)

    def decoder_layers(self, model):
        base = model.model
        return base.layers if hasattr(base, "layers") else base.language_model.layers  # the multimodal model's

    def attention_shape(self, cfg):
        """The largest layer's: q as wide as the full-attention layers' (global_head_dim), k/v as the sliding ones'
        (their num_key_value_heads · head_dim; a full layer's k doubles as its v with attention_k_eq_v)."""
        sliding, full = _layer_of(cfg, "sliding_attention"), _layer_of(cfg, "full_attention")
        dims = [layer for layer in (sliding, full) if layer is not None]
        head_dim = max(layer.head_dim for layer in dims)
        kv = max(layer.num_key_value_heads * layer.head_dim for layer in dims)
        return int(cfg.num_attention_heads), -(-kv // head_dim), int(head_dim)

    def router_probs(self, logits):
        return logits.float()  # Gemma4TextRouter returns its softmax probabilities, not logits

    def router_note(self, cfg):
        return (Family.router_note(self, cfg) + "; the router scores RMSNorm(h)·scale, and its renormalised top-k "
                "gates are scaled by a learned per-expert scale")

    # ---- modules -------------------------------------------------------------------------------
    def moe_blocks(self, model):
        for i, layer in enumerate(self.decoder_layers(model)):
            if getattr(layer, "enable_moe_block", False):
                view = layer.__dict__.get("_moetune_moe")
                if view is None:
                    view = layer.__dict__["_moetune_moe"] = Gemma4MoE(layer)
                yield i, view

    def router(self, block):
        return _with_weight(block.router)

    # ---- tiny models ---------------------------------------------------------------------------
    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden // 2, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, global_head_dim=hidden // 2,
                    num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True,
                    num_experts=experts, top_k_experts=top_k, moe_intermediate_size=hidden // 2,
                    hidden_size_per_layer_input=0, num_kv_shared_layers=0, sliding_window=16,
                    layer_types=[("full_attention" if i % 2 else "sliding_attention") for i in range(layers)],
                    max_position_embeddings=1024, final_logit_softcapping=30.0, initializer_range=hidden ** -0.5,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, global_head_dim=16, patch_size=4,
                      position_embedding_size=64, pooling_kernel_size=2, default_output_length=4)
        return dict(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True)

    def tiny_model(self, config):
        from transformers.models.gemma4 import Gemma4ForConditionalGeneration

        return Gemma4ForConditionalGeneration(config)

    def tiny_init(self, model, generator):
        # the router's per-expert scales, the norms and the layers' output scales start at 1 (transformers' init):
        # away from 1, so that a forward or an export that drops one shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("router.per_expert_scale", "router.scale")) or "layernorm" in name:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            for name, b in model.named_buffers():
                if name.endswith("layer_scalar"):  # each layer's output scale (a persistent buffer)
                    b.copy_(1 + 0.2 * torch.randn(b.shape, generator=generator))


FAMILY = Gemma4Family()
