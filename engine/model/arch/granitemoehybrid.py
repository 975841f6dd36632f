"""Granite-4.0-H (ibm-granite/granite-4.0-h-tiny: 40 layers, 64 experts, top-6, a shared MLP in every layer).

Granite-MoE's block (`block_sparse_moe`: `router` with a softmax over the top-k logits, the hub's fused
`input_linear` / `output_linear` experts) and μP multipliers, in a hybrid stack (transformers 5
`GraniteMoeHybridDecoderLayer`): most layers mix tokens with Mamba-2 (`mamba`), a few with attention (`self_attn`,
no positional embedding in the release: `position_embedding_type: nope`), and every layer adds a dense SwiGLU
`shared_mlp` (`input_linear` [2S, H], `output_linear` [H, S]) to the MoE output, with weight 1, outside the block.
The Mamba-2 layers run on transformers' own path (its PyTorch fallback without mamba_ssm / causal_conv1d);
attention LoRA applies to the attention layers only. Since the gates sum to 1, gated adapters beside the block merge
into the routed experts (the shared MLP, sized by its own `shared_intermediate_size`, is left as it is).
"""

from __future__ import annotations

from .granitemoe import GraniteMoeFamily


class GraniteMoeHybridFamily(GraniteMoeFamily):
    model_type = "granitemoehybrid"
    title = "Granite-4.0-H"
    examples = ("ibm-granite/granite-4.0-h-tiny", "ibm-granite/granite-4.0-h-small")
    published = "granite-4.0-h-tiny"
    gguf_arch = "granitehybrid"
    gguf_missing = ("MoETune's GGUF writer does not map Granite-4.0-H's Mamba-2 tensors to llama.cpp's "
                    "'granitehybrid' ones yet (llama.cpp runs the arch: convert the --format hf export with its "
                    "convert_hf_to_gguf.py)")

    def shared_expert_intermediate_size(self, cfg):
        return int(cfg.shared_intermediate_size)

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.num_hidden_layers))) if int(cfg.num_local_experts or 0) else ()

    def router_note(self, cfg):
        return super().router_note(cfg) + "; every layer also adds its dense shared MLP, with weight 1"

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        kwargs = super().tiny_config_kwargs(layers, hidden, experts, top_k, vocab)
        # Mamba-2 and attention layers alternating, Mamba first as in the release; no RoPE, as the release
        return dict(kwargs, shared_intermediate_size=hidden // 2, position_embedding_type="nope",
                    layer_types=["mamba" if i % 2 == 0 else "attention" for i in range(layers)],
                    mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16, mamba_n_groups=1)


FAMILY = GraniteMoeHybridFamily()
