"""Mixtral (mistralai/Mixtral-8x7B): 8 experts, top-2, gates always renormalised over the top-k.

Hub checkpoints name the block `block_sparse_moe` and the projections w1 (gate), w3 (up), w2 (down);
transformers 5.x calls the block `mlp`.
"""

from __future__ import annotations

from .base import Family


class MixtralFamily(Family):
    model_type = "mixtral"
    title = "Mixtral"
    examples = ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1")
    published = "Mixtral-8x7B-v0.1"
    expert_key_template = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"
    proj_names = {"w1": "gate", "w3": "up", "w2": "down"}
    renames = {".block_sparse_moe.": ".mlp."}
    gguf_arch = "llama"  # llama.cpp runs Mixtral as llama with experts (n_ff is the expert size)
    gguf_permute_qk = True  # llama ropes interleaved pairs; its converter permutes q/k rows
    gguf_norm_topk_prob = True

    def num_experts(self, cfg):
        return int(cfg.num_local_experts)

    def norm_topk_prob(self, cfg):
        return True

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden // 2,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=1024,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = MixtralFamily()
