"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B-Instruct: 48 layers, 512 experts, top-10 of a softmax router renormalised,
one shared expert scaled by a per-token sigmoid gate): the block and hybrid attention Qwen3.5-MoE has (three Gated
DeltaNet layers to one gated full-attention layer, zero-centred RMSNorms computed as x̂ · (1 + w)), in a text-only
checkpoint (`Qwen3NextForCausalLM`: `model.layers.…`, no vision tower; its Multi-Token-Prediction head `mtp.…` is
not loaded and the hf export leaves it out, as for Qwen3.5). The Gated DeltaNet fuses its input projections
(`in_proj_qkvz`, `in_proj_ba`, interleaved per key head) where Qwen3.5 has four; they run on transformers' own
path, and attention LoRA applies to the full-attention layers only (q_proj also gives the output gate).

Its experts (512 × 48 layers) are ~40 GB in NF4: on a 24 GB card it trains offloaded, with the host RAM the plan
names. GGUF is refused: llama.cpp's `qwen3next` wants `in_proj_qkvz` regrouped from per-key-head [q k v z] blocks
into attn_qkv + attn_gate and `in_proj_ba` as ssm_ba, which MoETune's writer does not map (the hf export converts
with llama.cpp's own convert_hf_to_gguf.py).
"""

from __future__ import annotations

from .base import Family
from .qwen2_moe import sparse_layers
from .qwen3_5_moe import Qwen35MoeFamily


class Qwen3NextFamily(Qwen35MoeFamily):
    model_type = "qwen3_next"
    text_model_type = ""
    title = "Qwen3-Next"
    examples = ("Qwen/Qwen3-Next-80B-A3B-Instruct", "Qwen/Qwen3-Next-80B-A3B-Thinking")
    published = "Qwen3-Next-80B-A3B-Instruct"
    expert_key_template = Family.expert_key_template  # text-only: model.layers.… as transformers names them
    renames = {}
    gguf_arch = "qwen3next"
    gguf_missing = ("llama.cpp's 'qwen3next' takes the Gated DeltaNet's fused in_proj_qkvz regrouped from per-key-head "
                    "[q k v z] blocks into attn_qkv + attn_gate and in_proj_ba as ssm_ba, which MoETune's GGUF writer "
                    "does not map; export hf and run llama.cpp's convert_hf_to_gguf.py on it")

    def peft_name(self, name):
        return Family.peft_name(self, name)

    def parse_expert_key(self, name):
        return Family.parse_expert_key(self, name)

    def model_config(self, cfg):
        return cfg

    def config_json_section(self, raw):
        return raw

    def norm_topk_prob(self, cfg):
        return Family.norm_topk_prob(self, cfg)  # Qwen3NextTopKRouter renormalises as the config says

    def moe_layers(self, cfg):
        return sparse_layers(cfg)  # Qwen's decoder_sparse_step / mlp_only_layers (every layer in the release)

    def skip_tensor(self, name, cfg):
        return self.is_mtp_tensor(name, cfg)

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts,
                    num_experts_per_tok=top_k, moe_intermediate_size=hidden // 2,
                    shared_expert_intermediate_size=hidden // 2, norm_topk_prob=True,
                    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=hidden // 4,
                    linear_value_head_dim=hidden // 4,
                    layer_types=[("full_attention" if i % 2 else "linear_attention") for i in range(layers)],
                    max_position_embeddings=1024, initializer_range=hidden ** -0.5,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def tiny_model(self, config):
        return Family.tiny_model(self, config)


FAMILY = Qwen3NextFamily()
