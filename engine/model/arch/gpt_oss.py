"""gpt-oss (openai/gpt-oss-20b: 32 experts, top-4; gpt-oss-120b: 128 experts, offloaded).

What differs from the other families (transformers 5 `GptOssExperts` / `GptOssTopKRouter`):
- the router is `mlp.router`, with a bias; its gates are a softmax over the top-k logits (they sum to 1);
- experts have biases, gate and up interleaved in one fused `gate_up_proj` [E, H, 2I] (gate the even columns),
  `down_proj` [E, I, H] (transposed against nn.Linear), and a clamped SwiGLU:
  (clamp(up, ±limit) + 1) · g·σ(alpha·g) with g = clamp(gate, max=limit);
- attention has biases and per-head sinks (transformers' own path computes them);
- the hub's release stores experts in MXFP4 (`gate_up_proj_blocks` [E, 2I, H/32, 16] + `_scales` [E, 2I, H/32],
  the same for down): `convert_stream` dequantises them expert by expert (transformers' own MXFP4 decoder) into
  canonical per-expert projections, which the streaming loader then quantises to NF4. A bf16 release (fused
  tensors) loads through the same path.
Canonical per-expert names (`model.layers.L.mlp.experts.E.gate_proj.weight`) exist only between the stream
converter and the loader; no hub checkpoint has them. Exports write the fused bf16 layout transformers saves.
"""

from __future__ import annotations

import re

import torch
from gguf.constants import Keys

from .base import GT, Family

_RAW = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_blocks|_scales)?")
_BIAS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_bias")
#: the clamped SwiGLU constants llama.cpp's gpt-oss graph hard-codes (src/llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE)
LLAMA_CPP_SWIGLU = (1.702, 7.0)


class ClampedSwiGLU:
    """gpt-oss's expert activation on (gate, up): (clamp(up, -limit, limit) + 1) · g · σ(alpha · g),
    g = clamp(gate, max=limit); zero where gate is zero (so zero-padded units add nothing)."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = float(alpha), float(limit)

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def __repr__(self) -> str:
        return f"clamped SwiGLU (alpha {self.alpha}, limit {self.limit})"


def interleave(first: torch.Tensor, second: torch.Tensor, dim: int) -> torch.Tensor:
    """Two tensors woven along `dim` (first at the even positions), gpt-oss's gate/up layout."""
    return torch.stack([first, second], dim=dim + 1).flatten(dim, dim + 1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One expert's MXFP4 matrix (blocks [out, in/32, 16] uint8, scales [out, in/32] uint8) as [out, in] in `dtype`,
    decoded by transformers' own MXFP4 dequantiser (exact: FP4 values times powers of two)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks.unsqueeze(0), scales.unsqueeze(0), dtype=dtype)[0].T


class GptOssFamily(Family):
    model_type = "gpt_oss"
    title = "gpt-oss"
    examples = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")
    published = "gpt-oss-20b"
    router_attr = "router"
    peft_per_expert = False  # the hub's experts are fused per layer
    experts_transposed = True  # gate_up_proj [E, H, 2I], down_proj [E, I, H]
    hub_expert_names = ("model.layers.{layer}.mlp.experts.gate_up_proj|down_proj (bf16, [E, in, out]) or "
                        "..._blocks + ..._scales (MXFP4)")
    gguf_arch = "gpt-oss"
    gguf_norm_topk_prob = True  # softmax over the top-k logits: the gates sum to 1
    gguf_sliding_window = True  # llama.cpp's gpt-oss graph alternates sliding-window and full attention
    gguf_tensors = {**Family.gguf_tensors,
                    "model.layers.{bid}.post_attention_layernorm": GT.ATTN_POST_NORM,
                    "model.layers.{bid}.self_attn.sinks": GT.ATTN_SINKS,
                    "model.layers.{bid}.mlp.router": GT.FFN_GATE_INP}
    gguf_tensors.pop("model.layers.{bid}.mlp.gate")

    def num_experts(self, cfg):
        return int(cfg.num_local_experts)

    def norm_topk_prob(self, cfg):
        return True

    # ---- the experts' form ----------------------------------------------------------------------
    def expert_glu(self, cfg):
        return ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit)

    def fused_view(self, fused, attr, expert, proj):
        rows = fused[expert]  # gate_up [H, 2I] (gate even columns), down [I, H]
        if attr == "gate_up_proj":
            return rows[:, 0::2].T if proj == "gate" else rows[:, 1::2].T
        return rows.T

    def canonical_experts(self, block):
        experts = self.experts(block)
        gate_up = experts.gate_up_proj.transpose(1, 2)
        return torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1), experts.down_proj.transpose(1, 2).contiguous()

    def expert_biases(self, block):
        experts = self.experts(block)
        b = experts.gate_up_proj_bias
        return torch.cat([b[:, 0::2], b[:, 1::2]], dim=1), experts.down_proj_bias

    # ---- hub tensors ------------------------------------------------------------------------------
    def raw_expert_layer(self, name):
        m = _RAW.fullmatch(name)
        return None if m is None else int(m[1])

    def convert_stream(self, tensors):
        pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # MXFP4 blocks / scales awaiting their pair
        for name, t in tensors:
            m = _RAW.fullmatch(name)
            if m is None:
                yield name, t
                continue
            layer, part, kind = int(m[1]), m[2], m[3]
            if kind is None:  # bf16 fused, module layout: gate_up [E, H, 2I], down [E, I, H]
                for e in range(t.shape[0]):
                    yield from self._per_expert(layer, e, part, t[e].T)
                continue
            got = pending.setdefault((layer, part), {})
            got[kind] = t
            if len(got) == 2:
                del pending[(layer, part)]
                blocks, scales = got["_blocks"], got["_scales"]
                if blocks.shape[:-1] != scales.shape:
                    raise ValueError(f"{name}: MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                                     "do not pair up; is the checkpoint complete?")
                for e in range(blocks.shape[0]):
                    yield from self._per_expert(layer, e, part, dequantize_mxfp4(blocks[e], scales[e]))
        if pending:
            (layer, part), got = next(iter(pending.items()))
            raise ValueError(f"layer {layer} {part}: the checkpoint has MXFP4 {', '.join(got)} without its pair.")

    def _per_expert(self, layer: int, expert: int, part: str, rows: torch.Tensor):
        """Canonical projections of one expert from its [out, in] matrix (gate_up rows interleaved)."""
        if part == "down_proj":
            yield self.expert_key_template.format(layer=layer, expert=expert, proj="down_proj"), rows
            return
        yield self.expert_key_template.format(layer=layer, expert=expert, proj="gate_proj"), rows[0::2]
        yield self.expert_key_template.format(layer=layer, expert=expert, proj="up_proj"), rows[1::2]

    def expert_checkpoint_tensors(self, layer, experts):
        prefix = f"model.layers.{layer}.mlp.experts."
        experts = list(experts)
        gate_up = torch.stack([interleave(w["gate"], w["up"], 0).T for w in experts])  # [E, H, 2I]
        yield prefix + "gate_up_proj", gate_up
        yield prefix + "down_proj", torch.stack([w["down"].T for w in experts])  # [E, I, H]

    def widen_non_expert(self, name, tensor, extra, cfg=None):
        if extra and _BIAS.fullmatch(name) and name.endswith("gate_up_proj_bias"):
            zeros = tensor.new_zeros(tensor.shape[0], extra)
            return interleave(torch.cat([tensor[:, 0::2], zeros], 1), torch.cat([tensor[:, 1::2], zeros], 1), 1)
        return tensor

    def tiny_init(self, model, generator):
        for _, block in self.moe_blocks(model):
            experts = self.experts(block)
            with torch.no_grad():
                for bias in (experts.gate_up_proj_bias, experts.down_proj_bias):
                    bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)

    # ---- GGUF (llama.cpp's 'gpt-oss') ----------------------------------------------------------------
    def gguf_stream(self, tensors):
        for name, t in self.convert_stream(tensors):
            m = _BIAS.fullmatch(name)
            if m is not None:
                prefix = f"model.layers.{m[1]}.mlp.experts."
                if m[2] == "down_proj":
                    yield prefix + "down_proj.bias", t
                else:
                    yield prefix + "gate_proj.bias", t[:, 0::2]
                    yield prefix + "up_proj.bias", t[:, 1::2]
            elif name.endswith(".self_attn.sinks"):
                yield name + ".weight", t
            else:
                yield name, t

    def gguf_tensor_name(self, name):
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate|up|down)_proj\.bias", name)
        if m is not None:
            return self.gguf_expert_tensor_name(int(m[1]), m[2]).removesuffix(".weight") + ".bias"
        return super().gguf_tensor_name(name)

    def gguf_hparams(self, cfg):
        return {Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: self.expert_intermediate_size(cfg),
                Keys.Attention.SLIDING_WINDOW: int(cfg.sliding_window)}

    def gguf_problems(self, cfg):
        problems = super().gguf_problems(cfg)
        if (float(cfg.swiglu_alpha), float(cfg.swiglu_limit)) != LLAMA_CPP_SWIGLU:
            problems.append(f"swiglu_alpha={cfg.swiglu_alpha}, swiglu_limit={cfg.swiglu_limit}, but llama.cpp's "
                            f"'gpt-oss' graph hard-codes alpha {LLAMA_CPP_SWIGLU[0]} and limit {LLAMA_CPP_SWIGLU[1]}")
        types = list(cfg.layer_types)
        if types != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(types))]:
            problems.append(f"layer_types={types}, but llama.cpp's 'gpt-oss' graph alternates sliding and full "
                            "attention, starting with sliding")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden // 2, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, num_local_experts=experts,
                    num_experts_per_tok=top_k, sliding_window=8, max_position_embeddings=1024,
                    # YaRN as the release has it, but truncate=true: llama.cpp only has that (the release's
                    # truncate=false is exported with a warning, tests/test_gpt_oss.py)
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": True, "original_max_position_embeddings": 32},
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILY = GptOssFamily()
