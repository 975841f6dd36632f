"""ERNIE-4.5-MoE (baidu/ERNIE-4.5-21B-A3B-PT: 64 experts, top-6, 2 shared experts, a dense first layer).

What differs from the other families (transformers 5 `Ernie4_5_MoeTopKRouter` / `Ernie4_5_MoeSparseMoeBlock`):
- the router (`mlp.gate`, fp32) takes a softmax over all experts, picks the top-k of the probabilities plus
  `moe_statics.e_score_correction_bias` (the bias only chooses; the gates are the plain probabilities), and
  renormalises the k gates to sum to 1; the hub names the bias `mlp.moe_statics.e_score_correction_bias`,
  transformers 5 `mlp.gate.moe_statics.e_score_correction_bias` (the `renames`);
- `mlp.shared_experts` is one plain SwiGLU MLP of width moe_intermediate_size · moe_num_shared_experts, added with
  weight 1 (no gate), so after a merge that widens the routed experts it is padded with zero units to the new width;
- only layers moe_layer_start_index..moe_layer_end_index (every moe_layer_interval-th) have experts; the others
  (the first one in the release) are dense MLPs of intermediate_size;
- RoPE rotates interleaved pairs, as llama.cpp's NORM rope does, so q/k are not permuted for GGUF;
- the release holds a Multi-Token-Prediction layer (`model.mtp_*`), which transformers does not build: skipped.
llama.cpp runs it as `ernie4_5-moe` (softmax gating, the correction bias as `exp_probs_b`, renormalised gates).
"""

from __future__ import annotations

import re

import torch
from gguf.constants import Keys

from .base import DENSE_AND_SHARED_FFN_TENSORS, GT, GGUF_TENSOR_NAMES, PROJECTIONS, Family

_SHARED = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight")
_BIAS = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:gate\.)?moe_statics\.e_score_correction_bias")
_MTP = re.compile(r"model\.mtp_")
#: llama.cpp's tensors only MoE layers have, and those only dense layers have
_MOE_ONLY = (GT.FFN_GATE_INP, GT.FFN_GATE_SHEXP, GT.FFN_UP_SHEXP, GT.FFN_DOWN_SHEXP)
_DENSE_ONLY = (GT.FFN_GATE, GT.FFN_UP, GT.FFN_DOWN)


class Ernie45MoeFamily(Family):
    model_type = "ernie4_5_moe"
    title = "ERNIE-4.5-MoE"
    examples = ("baidu/ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-300B-A47B-PT")
    published = "ERNIE-4.5-21B-A3B-PT"
    expert_intermediate_key = "moe_intermediate_size"
    renames = {".mlp.moe_statics.": ".mlp.gate.moe_statics."}
    gguf_arch = "ernie4_5-moe"
    gguf_norm_topk_prob = True  # llama.cpp's ernie4_5-moe graph renormalises the top-k gates, as transformers
    gguf_tensors = {**Family.gguf_tensors, **DENSE_AND_SHARED_FFN_TENSORS}

    # ---- facts ----------------------------------------------------------------------------------
    def num_experts(self, cfg):
        return int(cfg.moe_num_experts)

    def norm_topk_prob(self, cfg):
        return True  # the top-k gates are divided by their sum (clamped at moe_norm_min)

    def shared_expert_intermediate_size(self, cfg):
        return int(cfg.moe_intermediate_size) * int(cfg.moe_num_shared_experts or 0)

    def moe_layers(self, cfg):
        """Layers with experts, as transformers' Ernie4_5_MoeDecoderLayer decides."""
        end = int(cfg.moe_layer_end_index)
        end = int(cfg.num_hidden_layers) - 1 if end == -1 else end
        step, start = int(cfg.moe_layer_interval), int(cfg.moe_layer_start_index)
        return tuple(i for i in range(int(cfg.num_hidden_layers)) if (i + 1) % step == 0 and start <= i <= end)

    def shared_expert(self, block):
        return block.shared_experts

    # ---- hub tensors ------------------------------------------------------------------------------
    def is_mtp_tensor(self, name, cfg=None):
        """The release's Multi-Token-Prediction layer (`model.mtp_*`): transformers does not build it."""
        return _MTP.match(name) is not None

    def widen_non_expert(self, name, tensor, extra, cfg=None):
        """The shared experts padded with zero units as the routed ones widen by `extra` (their width is
        moe_intermediate_size · moe_num_shared_experts): silu(0)·0 adds nothing, so they compute the same."""
        m = _SHARED.fullmatch(name)
        if not extra or m is None:
            return tensor
        return _pad(tensor, extra * int(cfg.moe_num_shared_experts), dim=1 if m[2] == "down" else 0)

    def tiny_init(self, model, generator):
        for _, block in self.moe_blocks(model):
            bias = block.gate.moe_statics.e_score_correction_bias
            with torch.no_grad():  # about the size of the probabilities, so it changes which experts are chosen
                bias.copy_(torch.rand(bias.shape, generator=generator) * 0.5 / bias.shape[-1])

    # ---- GGUF (llama.cpp's 'ernie4_5-moe') ---------------------------------------------------------
    def gguf_stream(self, tensors):
        for name, t in tensors:
            if self.is_mtp_tensor(name):
                continue
            yield name, (t.reshape(-1) if _BIAS.fullmatch(name) else t)  # exp_probs_b is [E]

    def gguf_tensor_name(self, name):
        m = _BIAS.fullmatch(name)
        if m is not None:
            return GGUF_TENSOR_NAMES[GT.FFN_EXP_PROBS_B].format(bid=int(m[1])) + ".bias"
        return super().gguf_tensor_name(name)

    def gguf_required(self, cfg):
        """Dense layers hold llama.cpp's ffn_gate/up/down, MoE layers the router, experts and shared experts."""
        moe = set(self.moe_layers(cfg))
        shared = self.shared_expert_intermediate_size(cfg) > 0
        need = []
        for tensor in self.gguf_tensors.values():
            template = GGUF_TENSOR_NAMES[tensor] + ".weight"
            if "{bid}" not in template:
                need.append(template)
                continue
            for layer in range(int(cfg.num_hidden_layers)):
                if tensor in _DENSE_ONLY and layer in moe or tensor in _MOE_ONLY and (
                        layer not in moe or tensor != GT.FFN_GATE_INP and not shared):
                    continue
                need.append(template.format(bid=layer))
        return need + [self.gguf_expert_tensor_name(layer, p) for layer in sorted(moe) for p in PROJECTIONS]

    def gguf_hparams(self, cfg):
        return {Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: self.expert_intermediate_size(cfg),
                Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: self.shared_expert_intermediate_size(cfg),
                Keys.LLM.EXPERT_SHARED_COUNT: int(cfg.moe_num_shared_experts or 0),
                Keys.LLM.INTERLEAVE_MOE_LAYER_STEP: int(cfg.moe_layer_interval),
                Keys.LLM.LEADING_DENSE_BLOCK_COUNT: int(cfg.moe_layer_start_index)}

    def gguf_problems(self, cfg):
        problems = []
        moe, n = self.moe_layers(cfg), int(cfg.num_hidden_layers)
        start = int(cfg.moe_layer_start_index)
        if moe != tuple(range(start, n)):
            problems.append(f"experts in layers {list(moe)} (moe_layer_interval={cfg.moe_layer_interval}, "
                            f"moe_layer_end_index={cfg.moe_layer_end_index}), but llama.cpp's 'ernie4_5-moe' loads "
                            "experts in every layer from moe_layer_start_index on")
        if cfg.use_bias:
            problems.append("use_bias=true, but llama.cpp's 'ernie4_5-moe' graph applies no biases to the MLPs "
                            "and shared experts")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        # `layers` MoE layers after one dense layer, as the release starts. intermediate_size is chosen so that
        # llama.cpp's converter, which writes the shared experts' width as intermediate_size // num_key_value_heads
        # (right for the 21B release only), gets moe_intermediate_size · moe_num_shared_experts.
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                    moe_intermediate_size=hidden // 2, num_hidden_layers=layers + 1, moe_layer_start_index=1,
                    num_attention_heads=4, num_key_value_heads=2, moe_num_experts=experts, moe_k=top_k,
                    moe_num_shared_experts=2, max_position_embeddings=1024, tie_word_embeddings=True,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


FAMILY = Ernie45MoeFamily()
