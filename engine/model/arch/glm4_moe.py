"""GLM-4.5 (zai-org/GLM-4.5-Air): DeepSeek-V3's routing (sigmoid scores, `e_score_correction_bias` for the
choice, group-limited top-k, renormalised gates × `routed_scaling_factor`), one ungated shared expert and a dense
first layer, with plain grouped-query attention: q/k/v with biases, optional per-head q/k RMSNorm
(`use_qk_norm`), RoPE on the first `partial_rotary_factor` of each head (rotated halves: llama.cpp's NEOX).

GLM-4.5-Air's 45 MoE layers × 128 experts are 51.4 GB in NF4: on a 24 GB card they train offloaded only, from
pinned host memory (the planner names the host RAM that needs). The hub checkpoint's Multi-Token-Prediction
layer (`model.layers.46.*`) is skipped, as transformers skips it. llama.cpp runs it as `glm4moe`.
"""

from __future__ import annotations

from gguf.constants import Keys

from .base import DENSE_AND_SHARED_FFN_TENSORS, GT, Family
from .deepseek_v3 import DeepseekV3Family


class Glm4MoeFamily(DeepseekV3Family):
    model_type = "glm4_moe"
    title = "GLM-4.5"
    examples = ("zai-org/GLM-4.5-Air", "zai-org/GLM-4.5-Air-Base", "zai-org/GLM-4.5")
    published = "GLM-4.5-Air"
    attention_projections = Family.attention_projections
    gguf_arch = "glm4moe"
    gguf_lora_unsupported = ()
    gguf_tensors = {
        **Family.gguf_tensors,
        "model.layers.{bid}.post_attention_layernorm": GT.ATTN_POST_NORM,  # glm4moe's name for the FFN norm
        "model.layers.{bid}.self_attn.q_norm": GT.ATTN_Q_NORM, "model.layers.{bid}.self_attn.k_norm": GT.ATTN_K_NORM,
        **DENSE_AND_SHARED_FFN_TENSORS,
    }

    def gguf_hparams(self, cfg):
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        rotary = float((getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))
        return {Keys.Rope.DIMENSION_COUNT: int(head_dim * rotary), **self.gguf_moe_hparams(cfg)}

    def gguf_transform(self, cfg, target, tensor):
        return [(target, tensor)]  # plain attention: no MLA tensor to split

    def gguf_attention_tensors(self, cfg):
        qk_norm = [GT.ATTN_Q_NORM, GT.ATTN_K_NORM] if getattr(cfg, "use_qk_norm", False) else []
        return [GT.ATTN_NORM, GT.ATTN_POST_NORM, GT.ATTN_Q, GT.ATTN_K, GT.ATTN_V, GT.ATTN_OUT, *qk_norm]

    def gguf_problems(self, cfg):
        problems = []
        if int(cfg.n_shared_experts or 0) < 1:
            problems.append("n_shared_experts=0, but llama.cpp's 'glm4moe' graph adds a shared expert in every MoE "
                            "layer")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=hidden // 2,
                    num_hidden_layers=layers + 1, first_k_dense_replace=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=hidden // 4, attention_bias=True, use_qk_norm=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                    n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1, n_group=1,
                    topk_group=1,  # one group as GLM-4.5-Air (DeepSeek-V3's tiny model covers group-limited routing)
                    norm_topk_prob=True, routed_scaling_factor=1.5, max_position_embeddings=1024,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = Glm4MoeFamily()
