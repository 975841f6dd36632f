"""DeepSeek-V3 (moonshotai/Moonlight-16B-A3B; the same code path as DeepSeek-V3/R1 and Kimi-style models):
DeepSeek-V2's MLA, ungated shared experts and dense first layers, with a sigmoid router: each expert scored
on its own, `e_score_correction_bias` added for the choice only (the aux-loss-free balancing bias, a frozen
buffer here), group-limited top-k (`n_group` groups ranked by their best two, `topk_group` kept), the chosen
scores renormalised (`norm_topk_prob`) and scaled by `routed_scaling_factor`.

The balance loss of a sigmoid router is DeepSeek-V3's complementary sequence-wise loss computed over the
batch: E/k · Σ_e f_e · P_e with P_e the mean of the scores normalised to sum to 1 per token (1.0 when
balanced); the routing statistics count the experts as chosen, bias included. llama.cpp runs it as
`deepseek2` with sigmoid gating and `exp_probs_b`; Multi-Token-Prediction layers past `num_hidden_layers`
(DeepSeek-V3's layer 61) are not part of the model transformers builds and are refused by the loader.
"""

from __future__ import annotations

import re

import torch

from .base import GGUF_TENSOR_NAMES, GT
from .deepseek_v2 import DeepseekV2Family


class DeepseekV3Family(DeepseekV2Family):
    model_type = "deepseek_v3"
    title = "DeepSeek-V3"
    examples = ("moonshotai/Moonlight-16B-A3B", "moonshotai/Moonlight-16B-A3B-Instruct")
    published = "Moonlight-16B-A3B"
    router_scoring = "sigmoid"

    def num_experts(self, cfg):
        return int(cfg.n_routed_experts)

    def norm_topk_prob(self, cfg):
        return bool(cfg.norm_topk_prob)

    def topk_gate_sum(self, cfg):
        return float(cfg.routed_scaling_factor) if self.norm_topk_prob(cfg) else None

    def router_note(self, cfg):
        groups = int(cfg.n_group or 1)
        group = f", best {cfg.topk_group} of {groups} groups" if groups > 1 else ""
        norm = "renormalised" if self.norm_topk_prob(cfg) else "not renormalised"
        return (f"sigmoid router (top-{cfg.num_experts_per_tok} of {self.num_experts(cfg)} by score + "
                f"e_score_correction_bias{group}; gates {norm}, × {float(cfg.routed_scaling_factor):g}): balance "
                "loss = E · Σ_e f_e · P_e with P_e the mean sigmoid score normalised over the experts "
                "(DeepSeek-V3's sequence-wise balance loss over the batch; k when balanced); the bias is frozen")

    def gguf_tensor_name(self, name):
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", self.rename(name))
        if m is not None:
            return GGUF_TENSOR_NAMES[GT.FFN_EXP_PROBS_B].format(bid=int(m[1])) + ".bias"
        return super().gguf_tensor_name(name)

    def gguf_required(self, cfg):
        bias = [GGUF_TENSOR_NAMES[GT.FFN_EXP_PROBS_B].format(bid=i) + ".bias" for i in self.moe_layers(cfg)]
        return super().gguf_required(cfg) + bias

    def gguf_problems(self, cfg):
        problems = [p for p in super().gguf_problems(cfg) if "group_limited_greedy" not in p]
        if not getattr(cfg, "rope_interleave", True):
            problems.append("rope_interleave=false (RoPE over rotated halves), but llama.cpp's 'deepseek2' graph "
                            "ropes interleaved pairs")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        kwargs = super().tiny_config_kwargs(layers, hidden, experts, top_k, vocab)
        groups = 2 if experts % 2 == 0 and experts // 2 >= top_k else 1  # group-limited: the best 1 of 2 groups
        kwargs.update(q_lora_rank=hidden // 2, n_group=groups, topk_group=1,
                      norm_topk_prob=True, routed_scaling_factor=1.5, rope_interleave=True,
                      scoring_func="sigmoid", topk_method="noaux_tc")  # as the hub's configs say (llama.cpp reads them)
        return kwargs

    def tiny_init(self, model, generator):
        with torch.no_grad():  # the correction bias starts at zero: random values prove it is loaded and exported
            for _, block in self.moe_blocks(model):
                bias = block.gate.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.05)


FAMILY = DeepseekV3Family()
