"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B): 60 routed experts, top-4, plus one always-on shared
expert whose output is scaled by a sigmoid gate."""

from __future__ import annotations

from gguf.constants import Keys

from .base import GT, Family


class Qwen2MoeFamily(Family):
    model_type = "qwen2_moe"
    title = "Qwen2-MoE"
    examples = ("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B")
    published = "Qwen1.5-MoE-A2.7B"
    expert_intermediate_key = "moe_intermediate_size"
    gguf_arch = "qwen2moe"
    gguf_tensors = {**Family.gguf_tensors, "model.layers.{bid}.mlp.shared_expert.gate_proj": GT.FFN_GATE_SHEXP,
                    "model.layers.{bid}.mlp.shared_expert.up_proj": GT.FFN_UP_SHEXP,
                    "model.layers.{bid}.mlp.shared_expert.down_proj": GT.FFN_DOWN_SHEXP,
                    "model.layers.{bid}.mlp.shared_expert_gate": GT.FFN_GATE_INP_SHEXP}

    def gguf_hparams(self, cfg):
        return {Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: self.expert_intermediate_size(cfg),
                Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: self.shared_expert_intermediate_size(cfg)}

    def shared_expert_intermediate_size(self, cfg):
        return int(cfg.shared_expert_intermediate_size)

    def moe_layers(self, cfg):
        return sparse_layers(cfg)

    def shared_expert(self, block):
        return block.shared_expert

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=hidden // 2,
                    shared_expert_intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, num_experts=experts, num_experts_per_tok=top_k,
                    max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def sparse_layers(cfg) -> tuple[int, ...]:
    """Layers with routed experts under Qwen's `decoder_sparse_step` and `mlp_only_layers`."""
    only_mlp = set(cfg.mlp_only_layers or ())
    step = int(cfg.decoder_sparse_step)
    return tuple(i for i in range(int(cfg.num_hidden_layers))
                 if i not in only_mlp and cfg.num_experts > 0 and (i + 1) % step == 0)


FAMILY = Qwen2MoeFamily()
