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
llama.cpp runs it as `lfm2moe`: the short convolutions as its `shortconv` tensors (the kernel [H, L]), attention
layers told apart by their KV head count (0 for a conv layer, per layer), sigmoid gating with the expert bias as
`exp_probs_b`, the gates always renormalised and never scaled, the head tied to the embeddings.
"""

from __future__ import annotations

import re
import weakref

import torch
from gguf.constants import Keys

from .base import GGUF_TENSOR_NAMES, GT, PROJECTIONS, Family

_EXPERT_BIAS = re.compile(r"model\.layers\.(\d+)\.feed_forward\.expert_bias")
_CONV_KERNEL = re.compile(r"blk\.\d+\.shortconv\.conv\.weight")


class Lfm2MoeFamily(Family):
    model_type = "lfm2_moe"
    title = "LFM2-MoE"
    examples = ("LiquidAI/LFM2-8B-A1B",)
    published = "LFM2-8B-A1B"
    block_attr = "feed_forward"
    router_attr = "gate"
    final_norm_attr = "embedding_norm"  # applied after the last layer, despite its name
    expert_key_template = "model.layers.{layer}.feed_forward.experts.{expert}.{proj}.weight"
    proj_names = {"w1": "gate", "w3": "up", "w2": "down"}
    expert_intermediate_key = "moe_intermediate_size"
    attention_projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    router_scoring = "sigmoid"
    gguf_arch = "lfm2moe"
    gguf_norm_topk_prob = True  # llama.cpp's lfm2moe graph renormalises the top-k gates, as transformers
    gguf_tensors = {
        "model.embed_tokens": GT.TOKEN_EMBD, "lm_head": GT.OUTPUT,
        "model.embedding_norm": GT.TOKEN_EMBD_NORM,  # the final norm (llama.cpp: LLM_TENSOR_OUTPUT_NORM_LFM2)
        "model.layers.{bid}.operator_norm": GT.ATTN_NORM, "model.layers.{bid}.ffn_norm": GT.FFN_NORM,
        "model.layers.{bid}.self_attn.q_proj": GT.ATTN_Q, "model.layers.{bid}.self_attn.k_proj": GT.ATTN_K,
        "model.layers.{bid}.self_attn.v_proj": GT.ATTN_V, "model.layers.{bid}.self_attn.out_proj": GT.ATTN_OUT,
        "model.layers.{bid}.self_attn.q_layernorm": GT.ATTN_Q_NORM,
        "model.layers.{bid}.self_attn.k_layernorm": GT.ATTN_K_NORM,
        "model.layers.{bid}.conv.conv": GT.SHORTCONV_CONV, "model.layers.{bid}.conv.in_proj": GT.SHORTCONV_INPROJ,
        "model.layers.{bid}.conv.out_proj": GT.SHORTCONV_OUTPROJ,
        "model.layers.{bid}.feed_forward.w1": GT.FFN_GATE, "model.layers.{bid}.feed_forward.w3": GT.FFN_UP,
        "model.layers.{bid}.feed_forward.w2": GT.FFN_DOWN, "model.layers.{bid}.feed_forward.gate": GT.FFN_GATE_INP,
    }

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

    # ---- GGUF (llama.cpp's 'lfm2moe') ---------------------------------------------------------------
    def gguf_tensor_name(self, name):
        m = _EXPERT_BIAS.fullmatch(name)
        if m is not None:
            return GGUF_TENSOR_NAMES[GT.FFN_EXP_PROBS_B].format(bid=int(m[1])) + ".bias"
        return super().gguf_tensor_name(name)

    def gguf_transform(self, cfg, target, tensor):
        if _CONV_KERNEL.fullmatch(target):  # Conv1d's depthwise kernel [H, 1, L]: llama.cpp's ssm_conv takes [H, L]
            tensor = tensor.squeeze(1)
        return [(target, tensor)]

    def gguf_hparams(self, cfg):
        kv = int(cfg.num_key_value_heads)
        return {Keys.Attention.HEAD_COUNT_KV: [kv if t == "full_attention" else 0 for t in cfg.layer_types],
                Keys.Attention.LAYERNORM_RMS_EPS: float(cfg.norm_eps),
                Keys.ShortConv.L_CACHE: int(cfg.conv_L_cache),
                Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: self.expert_intermediate_size(cfg),
                Keys.LLM.LEADING_DENSE_BLOCK_COUNT: int(cfg.num_dense_layers),
                Keys.LLM.EXPERT_GATING_FUNC: 2}  # sigmoid

    def gguf_required(self, cfg):
        def name(t, bid=None, suffix="weight"):
            return GGUF_TENSOR_NAMES[t].format(bid=bid) + "." + suffix

        need = [name(GT.TOKEN_EMBD), name(GT.TOKEN_EMBD_NORM), name(GT.OUTPUT)]
        moe = set(self.moe_layers(cfg))
        for i, kind in enumerate(cfg.layer_types):
            mixer = [GT.ATTN_Q, GT.ATTN_K, GT.ATTN_V, GT.ATTN_OUT, GT.ATTN_Q_NORM, GT.ATTN_K_NORM] \
                if kind == "full_attention" else [GT.SHORTCONV_CONV, GT.SHORTCONV_INPROJ, GT.SHORTCONV_OUTPROJ]
            ffn = [GT.FFN_GATE_INP] if i in moe else [GT.FFN_GATE, GT.FFN_UP, GT.FFN_DOWN]
            need += [name(t, i) for t in [GT.ATTN_NORM, GT.FFN_NORM] + mixer + ffn]
            if i in moe:
                need += [self.gguf_expert_tensor_name(i, p) for p in PROJECTIONS]
                need.append(name(GT.FFN_EXP_PROBS_B, i, "bias"))
        return need

    def gguf_problems(self, cfg):
        problems = []
        if not self.norm_topk_prob(cfg):
            problems.append("norm_topk_prob=false, but llama.cpp's 'lfm2moe' graph always renormalises the top-k gates")
        if float(cfg.routed_scaling_factor) != 1.0:
            problems.append(f"routed_scaling_factor={float(cfg.routed_scaling_factor):g}, but llama.cpp's 'lfm2moe' "
                            "graph does not scale the gates")
        if not cfg.use_expert_bias:
            problems.append("use_expert_bias=false, but llama.cpp's 'lfm2moe' loads an expert bias in every MoE layer")
        if cfg.conv_bias:
            problems.append("conv_bias=true, but llama.cpp's 'lfm2moe' graph applies no biases to the short "
                            "convolutions")
        other = sorted(set(cfg.layer_types) - {"conv", "full_attention"})
        if other:
            problems.append(f"layer_types {other}: llama.cpp's 'lfm2moe' has conv and full_attention layers only")
        return problems

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
        # the expert bias starts at zero: shuffled values prove it is loaded, used and exported. They are 0.2 / E
        # apart: where scores saturate at 1 the bias alone chooses, and there no two experts are near a tie
        with torch.no_grad():
            for _, block in self.moe_blocks(model):
                bias = block.expert_bias
                bias.copy_(torch.randperm(bias.numel(), generator=generator).float() * (0.2 / bias.numel()))


FAMILY = Lfm2MoeFamily()
