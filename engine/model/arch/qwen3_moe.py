"""Qwen3-MoE (Qwen/Qwen3-30B-A3B): 128 experts, top-8, renormalised gates, q/k head norms, no shared expert."""

from __future__ import annotations

from gguf.constants import Keys

from .base import GT, Family
from .qwen2_moe import sparse_layers


class Qwen3MoeFamily(Family):
    model_type = "qwen3_moe"
    title = "Qwen3-MoE"
    examples = ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B")
    published = "Qwen3-30B-A3B"
    expert_intermediate_key = "moe_intermediate_size"
    gguf_arch = "qwen3moe"
    gguf_norm_topk_prob = True
    gguf_tensors = {**Family.gguf_tensors, "model.layers.{bid}.self_attn.q_norm": GT.ATTN_Q_NORM,
                    "model.layers.{bid}.self_attn.k_norm": GT.ATTN_K_NORM}

    def gguf_hparams(self, cfg):
        return {Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: self.expert_intermediate_size(cfg)}

    def moe_layers(self, cfg):
        return sparse_layers(cfg)

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=hidden // 2,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                    num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                    max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = Qwen3MoeFamily()
