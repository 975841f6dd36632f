"""Granite MoE (ibm-granite/granite-3.1-3b-a800m: 40 experts, top-8; granite-3.1-1b-a400m: 32 experts, top-8).

What differs from the other families (transformers 5 `GraniteMoeMoE` / `GraniteMoeTopKRouter`):
- the block is `block_sparse_moe`, its router `router` (no bias): the gates are a softmax over the top-k logits,
  so they always sum to 1 (renormalised, as llama.cpp's graph computes them);
- the experts are stored fused per layer, in the hub's checkpoints too: `block_sparse_moe.input_linear.weight`
  [E, 2I, H] (gate rows, then up rows) and `output_linear.weight` [E, H, I] — transformers 5's own
  `gate_up_proj` / `down_proj` layout under other names — and the router as `router.layer.weight`;
  `convert_stream` splits the fused tensors into per-expert canonical projections for the loader, and exports
  write them fused again under the hub's names;
- μP multipliers (embedding_multiplier, residual_multiplier on both sublayers, attention_multiplier as the
  attention scale, logits divided by logits_scaling): transformers' own model computes them, adapters sit inside
  the residual branches where they are scaled with the MoE output, and the GGUF carries them as llama.cpp's
  embedding_scale / residual_scale / attention.scale / logit_scale;
- RoPE rotates halves, llama.cpp's 'granitemoe' interleaved pairs: q/k rows are permuted for GGUF, as for Llama.
"""

from __future__ import annotations

from gguf.constants import Keys

from .base import GT, Family



class GraniteMoeFamily(Family):
    model_type = "granitemoe"
    title = "Granite-MoE"
    examples = ("ibm-granite/granite-3.1-3b-a800m-base", "ibm-granite/granite-3.1-3b-a800m-instruct",
                "ibm-granite/granite-3.1-1b-a400m-instruct")
    published = "granite-3.1-3b-a800m-base"
    block_attr = "block_sparse_moe"
    router_attr = "router"
    #: canonical per-expert names between `convert_stream` and the loader; no hub checkpoint has them
    expert_key_template = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"
    hub_fused_experts = ("model.layers.{layer}.block_sparse_moe.input_linear.weight",
                         "model.layers.{layer}.block_sparse_moe.output_linear.weight")
    renames = {".block_sparse_moe.router.layer.": ".block_sparse_moe.router."}
    peft_per_expert = False  # the hub's experts are fused per layer
    hub_expert_names = ("model.layers.{layer}.block_sparse_moe.input_linear.weight [E, 2I, H] (gate rows, then up) "
                        "and output_linear.weight [E, H, I]")
    gguf_arch = "granitemoe"
    gguf_permute_qk = True  # llama.cpp ropes interleaved pairs (its converter is Llama's, which permutes q/k)
    gguf_norm_topk_prob = True  # softmax over all, top-k, renormalised: transformers' softmax over the top-k logits
    gguf_tensors = {**Family.gguf_tensors, "model.layers.{bid}.block_sparse_moe.router": GT.FFN_GATE_INP}
    gguf_tensors.pop("model.layers.{bid}.mlp.gate")

    def num_experts(self, cfg):
        return int(cfg.num_local_experts)

    def norm_topk_prob(self, cfg):
        return True

    # ---- GGUF (llama.cpp's 'granitemoe') ------------------------------------------------------------
    def gguf_stream(self, tensors):
        return self.convert_stream(tensors)

    def gguf_hparams(self, cfg):
        return {Keys.LLM.EMBEDDING_SCALE: float(cfg.embedding_multiplier),
                Keys.LLM.RESIDUAL_SCALE: float(cfg.residual_multiplier),
                Keys.Attention.SCALE: float(cfg.attention_multiplier),
                Keys.LLM.LOGIT_SCALE: float(cfg.logits_scaling)}

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        # μP multipliers away from 1 so that llama.cpp's logits show a missing one, but milder than the release's
        # (embedding 12, residual 0.22, logits / 6), with which a tiny random model's embeddings would drown its
        # blocks (and the adapters under test); attention_multiplier half of 1/sqrt(head_dim)
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden // 2, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                    num_experts_per_tok=top_k, max_position_embeddings=1024, embedding_multiplier=2.0,
                    residual_multiplier=0.5, attention_multiplier=0.5 * (hidden // 4) ** -0.5, logits_scaling=2.0,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = GraniteMoeFamily()
