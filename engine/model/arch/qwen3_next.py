"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B-Instruct: 48 layers, 512 experts, top-10 of a softmax router renormalised,
one shared expert scaled by a per-token sigmoid gate): the block and hybrid attention Qwen3.5-MoE has (three Gated
DeltaNet layers to one gated full-attention layer, zero-centred RMSNorms computed as x̂ · (1 + w)), in a text-only
checkpoint (`Qwen3NextForCausalLM`: `model.layers.…`, no vision tower; its Multi-Token-Prediction head `mtp.…` is
not loaded and the hf export leaves it out, as for Qwen3.5). The Gated DeltaNet fuses its input projections
(`in_proj_qkvz`, `in_proj_ba`, interleaved per key head) where Qwen3.5 has four; they run on transformers' own
path, and attention LoRA applies to the full-attention layers only (q_proj also gives the output gate).

Its experts (512 × 48 layers) are ~40 GB in NF4: on a 24 GB card it trains offloaded, with the host RAM the plan
names. llama.cpp runs it as `qwen3next`, written as its converter writes it: `in_proj_qkvz` regrouped from per-key-
head [q k v z] blocks into attn_qkv (all q, all k, all v: the conv's channel order) and attn_gate (z), `in_proj_ba`
as ssm_ba as it is; value heads stay grouped by key head (no tiling, unlike qwen35moe); A = -exp(A_log), the conv
kernel [C, K], the (1 + w) RMSNorms as w + 1; plain partial RoPE (no M-RoPE sections).
"""

from __future__ import annotations

import re

import torch
from gguf.constants import Keys

from .base import GGUF_TENSOR_NAMES, GT, Family
from .qwen2_moe import sparse_layers
from .qwen3_5_moe import _PLUS_ONE_NORMS, Qwen35MoeFamily


class Qwen3NextFamily(Qwen35MoeFamily):
    model_type = "qwen3_next"
    text_model_type = ""
    title = "Qwen3-Next"
    examples = ("Qwen/Qwen3-Next-80B-A3B-Instruct", "Qwen/Qwen3-Next-80B-A3B-Thinking")
    published = "Qwen3-Next-80B-A3B-Instruct"
    expert_key_template = Family.expert_key_template  # text-only: model.layers.… as transformers names them
    renames = {}
    gguf_arch = "qwen3next"
    gguf_tensors = {**{k: v for k, v in Qwen35MoeFamily.gguf_tensors.items() if ".in_proj_" not in k},
                    "model.layers.{bid}.linear_attn.in_proj_qkvz": GT.ATTN_QKV,  # split in gguf_transform
                    "model.layers.{bid}.linear_attn.in_proj_ba": GT.SSM_BETA_ALPHA}

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

    # ---- GGUF (llama.cpp's 'qwen3next') -------------------------------------------------------------
    def gguf_transform(self, cfg, target, tensor):
        parts = target.split(".")
        kind = parts[2] if parts[0] == "blk" else parts[0]
        if kind in _PLUS_ONE_NORMS or kind == "output_norm":
            return [(target, tensor.float() + 1)]
        if kind == "ssm_a":
            return [(target, -torch.exp(tensor.float()))]
        if kind == "ssm_conv1d":
            return [(target, tensor.squeeze(1))]
        if kind == "attn_qkv":  # in_proj_qkvz [per key head: q k v z] as the converter splits it: all q, k, v; then z
            n_k, d_k = int(cfg.linear_num_key_heads), int(cfg.linear_key_head_dim)
            per_k = int(cfg.linear_num_value_heads) // n_k * int(cfg.linear_value_head_dim)
            q, k, v, z = tensor.reshape(n_k, 2 * d_k + 2 * per_k, -1).split([d_k, d_k, per_k, per_k], dim=1)
            rows = lambda x: x.reshape(-1, tensor.shape[-1])  # noqa: E731
            gate = GGUF_TENSOR_NAMES[GT.ATTN_GATE].format(bid=int(parts[1])) + ".weight"
            return [(target, torch.cat([rows(q), rows(k), rows(v)])), (gate, rows(z))]
        return [(target, tensor)]

    def gguf_hparams(self, cfg):  # qwen35moe's, but plain RoPE: no M-RoPE sections
        return {k: v for k, v in super().gguf_hparams(cfg).items() if k != Keys.Rope.DIMENSION_SECTIONS}

    def gguf_required(self, cfg):
        ba = GGUF_TENSOR_NAMES[GT.SSM_BETA_ALPHA]
        beta = GGUF_TENSOR_NAMES[GT.SSM_BETA]
        alpha = GGUF_TENSOR_NAMES[GT.SSM_ALPHA]
        need = []
        for name in super().gguf_required(cfg):
            layer = re.match(r"blk\.(\d+)\.", name)
            if layer and name == beta.format(bid=int(layer[1])) + ".weight":
                continue
            if layer and name == alpha.format(bid=int(layer[1])) + ".weight":
                name = ba.format(bid=int(layer[1])) + ".weight"
            need.append(name)
        return need

    def gguf_problems(self, cfg):
        # qwen35moe's limits, which qwen3next's graph shares, but no M-RoPE sections
        return [p.replace("'qwen35moe'", f"'{self.gguf_arch}'") for p in super().gguf_problems(cfg)
                if "mrope_section" not in p]

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
