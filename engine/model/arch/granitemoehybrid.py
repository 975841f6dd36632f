"""Granite-4.0-H (ibm-granite/granite-4.0-h-tiny: 40 layers, 64 experts, top-6, a shared MLP in every layer).

Granite-MoE's block (`block_sparse_moe`: `router` with a softmax over the top-k logits, the hub's fused
`input_linear` / `output_linear` experts) and μP multipliers, in a hybrid stack (transformers 5
`GraniteMoeHybridDecoderLayer`): most layers mix tokens with Mamba-2 (`mamba`), a few with attention (`self_attn`,
no positional embedding in the release: `position_embedding_type: nope`), and every layer adds a dense SwiGLU
`shared_mlp` (`input_linear` [2S, H], `output_linear` [H, S]) to the MoE output, with weight 1, outside the block.
The Mamba-2 layers run on transformers' own path (its PyTorch fallback without mamba_ssm / causal_conv1d);
attention LoRA applies to the attention layers only. Since the gates sum to 1, gated adapters beside the block merge
into the routed experts (the shared MLP, sized by its own `shared_intermediate_size`, is left as it is).
llama.cpp runs it as `granitehybrid`: Mamba-2 layers told apart by their KV head count (0, per layer), the SSM
tensors as its converter writes them (A = -exp(A_log), the conv kernel [C, K], the gated norm per group), the shared
MLP as the shared expert (`ffn_*_shexp`), RoPE only where the config asks for it (`rope.scaling.finetuned`).
"""

from __future__ import annotations

import re

import torch
from gguf.constants import Keys

from .base import GGUF_TENSOR_NAMES, GT, PROJECTIONS
from .granitemoe import GraniteMoeFamily

_SHARED_IN = re.compile(r"(model\.layers\.\d+\.shared_mlp\.)input_linear\.weight")
_SSM_PARAM = re.compile(r"model\.layers\.(\d+)\.mamba\.(A_log|D|dt_bias)")
_SSM_IN_GGUF = {"A_log": (GT.SSM_A, ""), "D": (GT.SSM_D, ""), "dt_bias": (GT.SSM_DT, ".bias")}


class GraniteMoeHybridFamily(GraniteMoeFamily):
    model_type = "granitemoehybrid"
    title = "Granite-4.0-H"
    examples = ("ibm-granite/granite-4.0-h-tiny", "ibm-granite/granite-4.0-h-small")
    published = "granite-4.0-h-tiny"
    gguf_arch = "granitehybrid"
    gguf_tensors = {**GraniteMoeFamily.gguf_tensors,
                    "model.layers.{bid}.mamba.in_proj": GT.SSM_IN, "model.layers.{bid}.mamba.conv1d": GT.SSM_CONV1D,
                    "model.layers.{bid}.mamba.norm": GT.SSM_NORM, "model.layers.{bid}.mamba.out_proj": GT.SSM_OUT,
                    "model.layers.{bid}.shared_mlp.gate": GT.FFN_GATE_SHEXP,
                    "model.layers.{bid}.shared_mlp.up": GT.FFN_UP_SHEXP,
                    "model.layers.{bid}.shared_mlp.output_linear": GT.FFN_DOWN_SHEXP}

    def shared_expert_intermediate_size(self, cfg):
        return int(cfg.shared_intermediate_size)

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.num_hidden_layers))) if int(cfg.num_local_experts or 0) else ()

    def router_note(self, cfg):
        return super().router_note(cfg) + "; every layer also adds its dense shared MLP, with weight 1"

    # ---- GGUF (llama.cpp's 'granitehybrid') ----------------------------------------------------------
    def gguf_stream(self, tensors):
        for name, t in super().gguf_stream(tensors):
            m = _SHARED_IN.fullmatch(name)
            if m is None:
                yield name, t
            else:  # the shared MLP's input_linear [2S, H]: gate rows, then up rows
                yield m[1] + "gate.weight", t[: t.shape[0] // 2]
                yield m[1] + "up.weight", t[t.shape[0] // 2:]

    def gguf_tensor_name(self, name):
        m = _SSM_PARAM.fullmatch(name)
        if m is not None:
            tensor, suffix = _SSM_IN_GGUF[m[2]]
            return GGUF_TENSOR_NAMES[tensor].format(bid=int(m[1])) + suffix
        return super().gguf_tensor_name(name)

    def gguf_transform(self, cfg, target, tensor):
        kind = target.split(".")[2] if target.startswith("blk.") else ""
        if kind == "ssm_a":  # llama.cpp takes A itself, [n_heads, 1]
            tensor = -torch.exp(tensor.float()).reshape(-1, 1)
        elif kind == "ssm_d":
            tensor = tensor.reshape(-1, 1)
        elif kind == "ssm_conv1d" and target.endswith(".weight"):  # the depthwise kernel [C, 1, K] as [C, K]
            tensor = tensor.squeeze(1)
        elif kind == "ssm_norm":  # the gated RMSNorm, normalised per group
            groups = int(cfg.mamba_n_groups)
            tensor = tensor.reshape(groups, -1)
        return [(target, tensor)]

    def gguf_hparams(self, cfg):
        kv = int(cfg.num_key_value_heads)
        return {**super().gguf_hparams(cfg),
                Keys.Attention.HEAD_COUNT_KV: [kv if t == "full_attention" else 0 for t in cfg.layers_block_type],
                Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: self.shared_expert_intermediate_size(cfg),
                Keys.SSM.CONV_KERNEL: int(cfg.mamba_d_conv), Keys.SSM.STATE_SIZE: int(cfg.mamba_d_state),
                Keys.SSM.GROUP_COUNT: int(cfg.mamba_n_groups),
                Keys.SSM.INNER_SIZE: int(cfg.mamba_expand) * int(cfg.hidden_size),
                Keys.SSM.TIME_STEP_RANK: int(cfg.mamba_n_heads),
                Keys.Rope.SCALING_FINETUNED: cfg.position_embedding_type == "rope"}  # llama.cpp's switch for RoPE

    def gguf_required(self, cfg):
        def name(t, bid=None, suffix=".weight"):
            return GGUF_TENSOR_NAMES[t].format(bid=bid) + suffix

        need = [name(GT.TOKEN_EMBD), name(GT.OUTPUT_NORM), name(GT.OUTPUT)]
        for i, kind in enumerate(cfg.layers_block_type):
            mixer = [GT.ATTN_Q, GT.ATTN_K, GT.ATTN_V, GT.ATTN_OUT] if kind == "full_attention" else \
                [GT.SSM_IN, GT.SSM_CONV1D, GT.SSM_NORM, GT.SSM_OUT]
            need += [name(t, i) for t in [GT.ATTN_NORM, GT.FFN_NORM, GT.FFN_GATE_INP, GT.FFN_GATE_SHEXP,
                                          GT.FFN_UP_SHEXP, GT.FFN_DOWN_SHEXP] + mixer]
            need += [self.gguf_expert_tensor_name(i, p) for p in PROJECTIONS]
            if kind != "full_attention":
                need += [name(GT.SSM_A, i, ""), name(GT.SSM_D, i, ""), name(GT.SSM_DT, i, ".bias")]
                need += [name(GT.SSM_CONV1D, i, ".bias")] if cfg.mamba_conv_bias else []
        return need

    def gguf_problems(self, cfg):
        problems = super().gguf_problems(cfg)
        if cfg.mamba_proj_bias:
            problems.append("mamba_proj_bias=true, but llama.cpp's 'granitehybrid' loads no Mamba-2 projection biases")
        if not int(cfg.num_local_experts or 0):
            problems.append("num_local_experts=0 (a dense Granite-4.0-H): MoETune trains MoE models only")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        kwargs = super().tiny_config_kwargs(layers, hidden, experts, top_k, vocab)
        # Mamba-2 and attention layers alternating, Mamba first as in the release; no RoPE, as the release
        return dict(kwargs, shared_intermediate_size=hidden // 2, position_embedding_type="nope",
                    layer_types=["mamba" if i % 2 == 0 else "attention" for i in range(layers)],
                    mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16, mamba_n_groups=1)


FAMILY = GraniteMoeHybridFamily()
