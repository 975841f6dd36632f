"""DeepSeek-V2 (deepseek-ai/DeepSeek-V2-Lite): 64 routed experts, top-6 of a softmax router (greedy, or
group-limited greedy), `routed_scaling_factor` on the gates, two ungated shared experts added with weight 1,
dense MLPs in the first `first_k_dense_replace` layers, and Multi-head Latent Attention (MLA).

MLA's projections are `q_proj` (or `q_a_proj` → `q_a_layernorm` → `q_b_proj` when `q_lora_rank` is set),
`kv_a_proj_with_mqa` → `kv_a_layernorm` → `kv_b_proj`, and `o_proj`; attention LoRA wraps those a layer has.
llama.cpp runs it as `deepseek2`, with `kv_b_proj` split per head into `attn_k_b` (transposed) and `attn_v_b`
as its converter writes them. The code path is shared with DeepSeek-V3 (engine/arch/deepseek_v3.py).
"""

from __future__ import annotations

import re

from gguf.constants import Keys

from .base import DENSE_AND_SHARED_FFN_TENSORS, GGUF_TENSOR_NAMES, GT, PROJECTIONS, Family

_SHARED = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight")
_EXPERT_GATING = {"softmax": 1, "sigmoid": 2}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


class DeepseekV2Family(Family):
    model_type = "deepseek_v2"
    title = "DeepSeek-V2"
    examples = ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite-Chat",
                "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct")
    published = "DeepSeek-V2-Lite"
    expert_intermediate_key = "moe_intermediate_size"
    attention_projections = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    shared_expert_ungated = True
    gguf_arch = "deepseek2"
    # llama.cpp's deepseek2 graph multiplies these with ggml_mul_mat (no LoRA); only attn_output takes one
    gguf_lora_unsupported = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    gguf_tensors = {
        "model.embed_tokens": GT.TOKEN_EMBD, "model.norm": GT.OUTPUT_NORM, "lm_head": GT.OUTPUT,
        "model.layers.{bid}.input_layernorm": GT.ATTN_NORM,
        "model.layers.{bid}.post_attention_layernorm": GT.FFN_NORM,
        "model.layers.{bid}.self_attn.q_proj": GT.ATTN_Q, "model.layers.{bid}.self_attn.q_a_proj": GT.ATTN_Q_A,
        "model.layers.{bid}.self_attn.q_a_layernorm": GT.ATTN_Q_A_NORM,
        "model.layers.{bid}.self_attn.q_b_proj": GT.ATTN_Q_B,
        "model.layers.{bid}.self_attn.kv_a_proj_with_mqa": GT.ATTN_KV_A_MQA,
        "model.layers.{bid}.self_attn.kv_a_layernorm": GT.ATTN_KV_A_NORM,
        "model.layers.{bid}.self_attn.kv_b_proj": GT.ATTN_KV_B,
        "model.layers.{bid}.self_attn.o_proj": GT.ATTN_OUT,
        "model.layers.{bid}.mlp.gate": GT.FFN_GATE_INP,
        **DENSE_AND_SHARED_FFN_TENSORS,
    }

    # ---- facts ---------------------------------------------------------------------------------
    def norm_topk_prob(self, cfg):
        return False  # transformers' DeepseekV2TopkRouter never renormalises (whatever config.json says)

    def topk_gate_sum(self, cfg):
        return None  # the top-k of a softmax over all experts: their sum varies by token

    def shared_expert_intermediate_size(self, cfg):
        return int(cfg.moe_intermediate_size) * int(cfg.n_shared_experts)

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.first_k_dense_replace), int(cfg.num_hidden_layers)))

    def shared_expert(self, block):
        return block.shared_experts

    def router_note(self, cfg):
        scale = float(cfg.routed_scaling_factor)
        return (f"softmax router (top-{cfg.num_experts_per_tok} of {self.num_experts(cfg)}, gates × {scale:g}, "
                "not renormalised): balance loss = E · Σ_e f_e · P_e over the softmax probabilities "
                "(transformers' load_balancing_loss_func, DeepSeek-V2's expert-level loss; k when balanced)")

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=hidden // 2,
                    num_hidden_layers=layers + 1, first_k_dense_replace=1, num_attention_heads=4,
                    num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=hidden // 2, qk_nope_head_dim=hidden // 8,
                    qk_rope_head_dim=hidden // 8, v_head_dim=hidden // 8, n_routed_experts=experts,
                    num_experts_per_tok=top_k, n_shared_experts=1, n_group=1, topk_group=1, topk_method="greedy",
                    scoring_func="softmax",  # not read by transformers; the hub's configs carry it (llama.cpp reads it)
                    routed_scaling_factor=1.0, max_position_embeddings=1024,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)

    # ---- merges --------------------------------------------------------------------------------
    def shared_expert_proj(self, name):
        m = _SHARED.fullmatch(name)
        return None if m is None else (int(m[1]), m[2])

    def shared_expert_layout(self, cfg, expert_intermediate, extra):
        # the shared experts are n_shared_experts × moe_intermediate_size wide: grow by whole experts
        n = int(cfg.n_shared_experts) + -(-extra // expert_intermediate)
        return n * expert_intermediate, {"n_shared_experts": n}

    # ---- GGUF ----------------------------------------------------------------------------------
    def gguf_hparams(self, cfg):
        kv_rank, rope = int(cfg.kv_lora_rank), int(cfg.qk_rope_head_dim)
        out = {Keys.Attention.HEAD_COUNT_KV: 1,  # MLA runs as MQA over the latent (as llama.cpp's converter writes)
               Keys.Attention.KEY_LENGTH: kv_rank + rope, Keys.Attention.VALUE_LENGTH: kv_rank,
               Keys.Attention.KEY_LENGTH_MLA: int(cfg.qk_nope_head_dim) + rope,
               Keys.Attention.VALUE_LENGTH_MLA: int(cfg.v_head_dim),
               Keys.Attention.Q_LORA_RANK: int(cfg.q_lora_rank or 0), Keys.Attention.KV_LORA_RANK: kv_rank,
               Keys.Rope.DIMENSION_COUNT: rope, **self.gguf_moe_hparams(cfg)}
        mscale_all = (getattr(cfg, "rope_parameters", None) or {}).get("mscale_all_dim")
        if mscale_all:  # as llama.cpp's converter writes it (its loader divides by 0.1 again)
            out[Keys.Rope.SCALING_YARN_LOG_MUL] = 0.1 * float(mscale_all)
        return out

    def gguf_moe_hparams(self, cfg):
        """llama.cpp's MoE keys of the DeepSeek routing (dense lead layers, shared experts, gating, groups), which
        GLM-4.5's `glm4moe` reads too."""
        out = {Keys.LLM.LEADING_DENSE_BLOCK_COUNT: int(cfg.first_k_dense_replace),
               Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: self.expert_intermediate_size(cfg),
               Keys.LLM.EXPERT_SHARED_COUNT: int(cfg.n_shared_experts),
               Keys.LLM.EXPERT_WEIGHTS_SCALE: float(cfg.routed_scaling_factor),
               Keys.LLM.EXPERT_WEIGHTS_NORM: self.norm_topk_prob(cfg),
               Keys.LLM.EXPERT_GATING_FUNC: _EXPERT_GATING[self.router_scoring]}
        if int(getattr(cfg, "n_group", None) or 1) > 1:
            out[Keys.LLM.EXPERT_GROUP_COUNT] = int(cfg.n_group)
            out[Keys.LLM.EXPERT_GROUP_USED_COUNT] = int(cfg.topk_group)
        return out

    def gguf_transform(self, cfg, target, tensor):
        m = re.fullmatch(r"blk\.(\d+)\.attn_kv_b\.weight", target)
        if m is None:
            return [(target, tensor)]
        heads, nope, v = int(cfg.num_attention_heads), int(cfg.qk_nope_head_dim), int(cfg.v_head_dim)
        k_b, v_b = tensor.reshape(heads, nope + v, tensor.shape[-1]).split([nope, v], dim=1)
        bid = int(m[1])
        return [(GGUF_TENSOR_NAMES[GT.ATTN_K_B].format(bid=bid) + ".weight", k_b.transpose(1, 2)),
                (GGUF_TENSOR_NAMES[GT.ATTN_V_B].format(bid=bid) + ".weight", v_b)]

    def gguf_attention_tensors(self, cfg) -> list:
        """llama.cpp's tensors of one layer's attention and the layer's two norms (MLA's, as llama.cpp splits them)."""
        attn = [GT.ATTN_Q_A, GT.ATTN_Q_A_NORM, GT.ATTN_Q_B] if cfg.q_lora_rank else [GT.ATTN_Q]
        return [GT.ATTN_NORM, GT.FFN_NORM, *attn, GT.ATTN_KV_A_MQA, GT.ATTN_KV_A_NORM, GT.ATTN_K_B, GT.ATTN_V_B,
                GT.ATTN_OUT]

    def gguf_required(self, cfg):
        def name(t, bid=None):
            return GGUF_TENSOR_NAMES[t].format(bid=bid) + ".weight"

        need = [name(GT.TOKEN_EMBD), name(GT.OUTPUT_NORM), name(GT.OUTPUT)]
        moe = set(self.moe_layers(cfg))
        for i in range(int(cfg.num_hidden_layers)):
            ffn = [GT.FFN_GATE_INP, GT.FFN_GATE_SHEXP, GT.FFN_UP_SHEXP, GT.FFN_DOWN_SHEXP] if i in moe else \
                [GT.FFN_GATE, GT.FFN_UP, GT.FFN_DOWN]
            need += [name(t, i) for t in [*self.gguf_attention_tensors(cfg), *ffn]]
            if i in moe:
                need += [self.gguf_expert_tensor_name(i, p) for p in PROJECTIONS]
        return need

    def gguf_problems(self, cfg):
        problems = []
        if getattr(cfg, "topk_method", "greedy") == "group_limited_greedy" and int(cfg.n_group or 1) > 1:
            problems.append(f"topk_method='group_limited_greedy' with n_group={cfg.n_group} ranks groups by their "
                            "best expert, but llama.cpp's 'deepseek2' graph ranks them by their best two")
        if int(cfg.n_shared_experts or 0) < 1:
            problems.append("n_shared_experts=0, but llama.cpp's 'deepseek2' graph needs shared experts in every MoE "
                            "layer")
        if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
            problems.append("biased linear layers, which llama.cpp's 'deepseek2' graph does not add")
        return problems


FAMILY = DeepseekV2Family()
