"""OLMoE (allenai/OLMoE-1B-7B): 64 experts, top-8, gates not renormalised, q/k RMSNorm."""

from __future__ import annotations

from .base import GT, Family


class OlmoeFamily(Family):
    model_type = "olmoe"
    title = "OLMoE"
    examples = ("allenai/OLMoE-1B-7B-0924", "allenai/OLMoE-1B-7B-0125-Instruct")
    published = "OLMoE-1B-7B-0924"
    gguf_arch = "olmoe"
    gguf_tensors = {**Family.gguf_tensors, "model.layers.{bid}.self_attn.q_norm": GT.ATTN_Q_NORM,
                    "model.layers.{bid}.self_attn.k_norm": GT.ATTN_K_NORM}

    def gguf_problems(self, cfg):
        problems = super().gguf_problems(cfg)
        if getattr(cfg, "clip_qkv", None) is not None:
            problems.append(f"clip_qkv={cfg.clip_qkv}, but llama.cpp's 'olmoe' graph does not clip q/k/v")
        if int(cfg.num_key_value_heads) != int(cfg.num_attention_heads):
            problems.append("num_key_value_heads differs from num_attention_heads, but llama.cpp's 'olmoe' "
                            "graph needs k_norm over the full hidden size")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden // 2,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                    num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=1024,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = OlmoeFamily()
