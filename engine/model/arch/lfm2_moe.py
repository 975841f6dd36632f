"""LFM2-MoE (LiquidAI/LFM2-8B-A1B: 32 experts, top-4, two dense first layers; 8.3 B parameters, 1.5 B active).

What differs from the other families (transformers 5 `Lfm2MoeSparseMoeBlock` / `Lfm2MoeTopKRouter`):
- hybrid layers: most are gated short convolutions (`conv`: in_proj, a depthwise Conv1d over `conv_L_cache`
  positions, out_proj), the rest grouped-query attention (`self_attn`: q/k/v_proj, `out_proj`, per-head q/k RMSNorm);
  the convolutions run on transformers' own path, attention LoRA applies to the attention layers only (the ones
  with q/k/v/out_proj; `parameter_report()["by_layer"]` shows which);
- the MoE block is the layer's `feed_forward` (the first `num_dense_layers` are a dense SwiGLU MLP w1/w3/w2); the hub
  names each expert's projections `feed_forward.experts.N.w1` (gate), `w3` (up), `w2` (down);
- a sigmoid router: each expert scored on its own, the block's `expert_bias` buffer (aux-loss-free balancing, frozen
  here) added for the choice only, the chosen scores renormalised (`norm_topk_prob`) and × `routed_scaling_factor`;
  no shared expert; the config names no `hidden_act` (the experts are SwiGLU).
"""

from __future__ import annotations

import weakref

import torch

from .base import Family


class Lfm2MoeFamily(Family):
    model_type = "lfm2_moe"
    title = "LFM2-MoE"
    examples = ("LiquidAI/LFM2-8B-A1B",)
    published = "LFM2-8B-A1B"
    block_attr = "feed_forward"
    router_attr = "gate"
    expert_key_template = "model.layers.{layer}.feed_forward.experts.{expert}.{proj}.weight"
    proj_names = {"w1": "gate", "w3": "up", "w2": "down"}
    expert_intermediate_key = "moe_intermediate_size"
    attention_projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    router_scoring = "sigmoid"

    # ---- facts ----------------------------------------------------------------------------------
    def activation(self, cfg):
        return "silu"  # Lfm2MoeExperts: silu(w1 x) · w3 x

    def norm_topk_prob(self, cfg):
        return bool(cfg.norm_topk_prob)

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.num_dense_layers), int(cfg.num_hidden_layers)))

    def topk_gate_sum(self, cfg):
        return float(cfg.routed_scaling_factor) if self.norm_topk_prob(cfg) else None

    def router_note(self, cfg):
        bias = " + expert_bias" if cfg.use_expert_bias else ""
        norm = "renormalised" if self.norm_topk_prob(cfg) else "not renormalised"
        return (f"sigmoid router (top-{cfg.num_experts_per_tok} of {self.num_experts(cfg)} by score{bias}; gates "
                f"{norm}, × {float(cfg.routed_scaling_factor):g}): balance loss = E · Σ_e f_e · P_e with P_e the mean "
                "sigmoid score normalised over the experts (k when balanced); the expert bias is frozen")

    # ---- modules ------------------------------------------------------------------------------------
    def router(self, block):
        """The block's `gate`, which takes the block's `expert_bias` buffer as an argument: called with the hidden
        states alone (as every consumer of `Family.router` calls a router) it is given the block's own bias, so
        its choice is the block's."""
        gate = block.gate
        if getattr(block, "use_expert_bias", False) and getattr(gate, "_moetune_bias_hook", None) is None:
            owner = weakref.ref(block)  # looked up at each call: the loader replaces buffers when it moves them

            def with_block_bias(module, args, kwargs):
                if len(args) < 2 and kwargs.get("expert_bias") is None:
                    kwargs = {**kwargs, "expert_bias": owner().expert_bias}
                return args, kwargs

            gate._moetune_bias_hook = gate.register_forward_pre_hook(with_block_bias, with_kwargs=True)
        return gate

    # ---- tiny models ------------------------------------------------------------------------------
    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        # one dense layer, then `layers` MoE layers; short-conv and attention layers alternate, so both kinds hold
        # experts (the release: 18 conv, 6 attention layers)
        total = layers + 1
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=hidden // 2,
                    num_hidden_layers=total, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    layer_types=["full_attention" if i % 2 else "conv" for i in range(total)],
                    num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, use_expert_bias=True,
                    routed_scaling_factor=1.0, conv_L_cache=3, conv_bias=False, max_position_embeddings=1024,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def tiny_init(self, model, generator):
        with torch.no_grad():  # the expert bias starts at zero: random values prove it is loaded, used and exported
            for _, block in self.moe_blocks(model):
                bias = block.expert_bias
                bias.copy_(torch.rand(bias.shape, generator=generator) * 0.2)


FAMILY = Lfm2MoeFamily()
