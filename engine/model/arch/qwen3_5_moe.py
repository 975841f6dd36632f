"""Qwen3.5-MoE (Qwen/Qwen3.5-35B-A3B): 256 experts, top-8 of a softmax router, always renormalised, plus one
shared expert scaled by a per-token sigmoid gate (as Qwen2-MoE); hybrid attention: three Gated DeltaNet
(linear-attention) layers to one full-attention layer, every layer with experts.

The published checkpoint is the multimodal one (`Qwen3_5MoeForConditionalGeneration`): the language model under
`model.language_model.…`, a vision tower under `model.visual.…`, a Multi-Token-Prediction head under `mtp.…`.
MoETune builds and trains the language model alone (transformers' `Qwen3_5MoeForCausalLM`, from `text_config`):
the vision tower and the MTP head are not loaded; the hf export writes the hub's multimodal layout with the
vision tower copied unchanged (so the merged model still reads images) and without the MTP head. The linear-
attention layers run on transformers' own path (its PyTorch fallback without flash-linear-attention); attention
LoRA applies to the full-attention layers only, which have q/k/v/o (`parameter_report()["by_layer"]` shows which).

llama.cpp runs the language model as `qwen35moe`, written as its converter writes it: the Gated DeltaNet's
in_proj_qkv / in_proj_z / in_proj_a / in_proj_b as attn_qkv / attn_gate / ssm_alpha / ssm_beta, their value heads
(and those of A, dt_bias, the conv kernel's value channels, out_proj's columns) reordered from grouped by key head
to tiled, which its graph broadcasts; A = -exp(A_log); the conv kernel [C, K]; the RMSNorms transformers computes as
x̂ · (1 + w) written as w + 1 (the linear attention's gated norm is plain x̂ · w); q_proj's per-head query / gate
halves as they are (llama.cpp splits them the same way); `attention.recurrent_layers` from layer_types; partial
interleaved M-RoPE, whose text positions are equal in every section (plain RoPE on the first rotary dims). The
`gguf-lora` export holds the full-attention layers' and the experts' LoRA, both of which llama.cpp's graph applies.
"""

from __future__ import annotations

import re

import torch
from gguf.constants import Keys

from .base import GGUF_TENSOR_NAMES, GT, PROJECTIONS, Family
from .qwen2_moe import Qwen2MoeFamily

_SSM_PARAM = re.compile(r"model\.layers\.(\d+)\.linear_attn\.(A_log|dt_bias)")
#: the RMSNorms transformers computes as x̂ · (1 + w) (Qwen3_5MoeRMSNorm); llama.cpp's as x̂ · w
_PLUS_ONE_NORMS = ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm")
#: the gguf package names the per-layer recurrent flags under this key in llama.cpp's gguf-py, not yet in ours
RECURRENT_LAYERS = "{arch}.attention.recurrent_layers"


class Qwen35MoeFamily(Qwen2MoeFamily):
    model_type = "qwen3_5_moe"
    text_model_type = "qwen3_5_moe_text"
    title = "Qwen3.5-MoE"
    examples = ("Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.6-35B-A3B")
    published = "Qwen3.5-35B-A3B"
    expert_key_template = "model.language_model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    renames = {"model.language_model.": "model."}
    gguf_arch = "qwen35moe"
    gguf_norm_topk_prob = True  # llama.cpp's qwen35moe graph renormalises the top-k gates, as transformers
    gguf_tensors = {
        "model.embed_tokens": GT.TOKEN_EMBD, "model.norm": GT.OUTPUT_NORM, "lm_head": GT.OUTPUT,
        "model.layers.{bid}.input_layernorm": GT.ATTN_NORM,
        "model.layers.{bid}.post_attention_layernorm": GT.ATTN_POST_NORM,
        "model.layers.{bid}.self_attn.q_proj": GT.ATTN_Q, "model.layers.{bid}.self_attn.k_proj": GT.ATTN_K,
        "model.layers.{bid}.self_attn.v_proj": GT.ATTN_V, "model.layers.{bid}.self_attn.o_proj": GT.ATTN_OUT,
        "model.layers.{bid}.self_attn.q_norm": GT.ATTN_Q_NORM, "model.layers.{bid}.self_attn.k_norm": GT.ATTN_K_NORM,
        "model.layers.{bid}.linear_attn.in_proj_qkv": GT.ATTN_QKV,
        "model.layers.{bid}.linear_attn.in_proj_z": GT.ATTN_GATE,
        "model.layers.{bid}.linear_attn.in_proj_a": GT.SSM_ALPHA,
        "model.layers.{bid}.linear_attn.in_proj_b": GT.SSM_BETA,
        "model.layers.{bid}.linear_attn.conv1d": GT.SSM_CONV1D, "model.layers.{bid}.linear_attn.norm": GT.SSM_NORM,
        "model.layers.{bid}.linear_attn.out_proj": GT.SSM_OUT,
        "model.layers.{bid}.mlp.gate": GT.FFN_GATE_INP,
        "model.layers.{bid}.mlp.shared_expert.gate_proj": GT.FFN_GATE_SHEXP,
        "model.layers.{bid}.mlp.shared_expert.up_proj": GT.FFN_UP_SHEXP,
        "model.layers.{bid}.mlp.shared_expert.down_proj": GT.FFN_DOWN_SHEXP,
        "model.layers.{bid}.mlp.shared_expert_gate": GT.FFN_GATE_INP_SHEXP,
    }

    def peft_name(self, name):
        # transformers loads this checkpoint's language model as Qwen3_5MoeForCausalLM (model.layers.…), the model
        # a PEFT adapter of it is applied to
        return self.rename(name)

    def parse_expert_key(self, name):
        key = super().parse_expert_key(name)
        if key is None and name.startswith("model.layers."):  # the language model's own (PEFT) name
            key = super().parse_expert_key(name.replace("model.", "model.language_model.", 1))
        return key

    def model_config(self, cfg):
        return cfg.text_config if getattr(cfg, "model_type", "") == self.model_type else cfg

    def config_json_section(self, raw):
        return raw.get("text_config", raw)

    def norm_topk_prob(self, cfg):
        return True  # transformers' Qwen3_5MoeTopKRouter always renormalises the top-k

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.num_hidden_layers)))  # every decoder layer has the sparse MoE block

    def is_mtp_tensor(self, name, cfg=None):
        return name.startswith("mtp.")

    def skip_tensor(self, name, cfg):
        return name.startswith(("mtp.", "model.visual."))

    def router_note(self, cfg):
        return Family.router_note(self, cfg) + "; the shared expert is scaled by its own sigmoid gate"

    # ---- GGUF (llama.cpp's 'qwen35moe') -------------------------------------------------------------
    def gguf_tensor_name(self, name):
        m = _SSM_PARAM.fullmatch(self.rename(name))
        if m is not None:  # A_log as llama.cpp's ssm_a (A itself, no suffix), dt_bias as ssm_dt's bias
            return GGUF_TENSOR_NAMES[GT.SSM_A if m[2] == "A_log" else GT.SSM_DT].format(bid=int(m[1])) + \
                ("" if m[2] == "A_log" else ".bias")
        return super().gguf_tensor_name(name)

    def gguf_transform(self, cfg, target, tensor):
        """As llama.cpp's converter writes Qwen3.5: A = -exp(A_log); the conv kernel [C, K]; (1 + w) norms as w; the
        value heads of the Gated DeltaNet tensors from grouped by key head (k0: v0 v1, k1: v0 v1) to tiled (v0: k0
        k1, v1: k0 k1), which llama.cpp's graph broadcasts the key heads over."""
        parts = target.split(".")
        kind = parts[2] if parts[0] == "blk" else parts[0]
        tensor = tensor.float() if kind in _PLUS_ONE_NORMS + ("output_norm", "ssm_a") else tensor
        if kind in _PLUS_ONE_NORMS or kind == "output_norm":
            return [(target, tensor + 1)]
        n_k, n_v = int(cfg.linear_num_key_heads), int(cfg.linear_num_value_heads)
        d_k, d_v = int(cfg.linear_key_head_dim), int(cfg.linear_value_head_dim)
        tile = lambda t, dim, head: _tile_value_heads(t, dim, n_k, n_v // n_k, head)  # noqa: E731
        if kind == "ssm_a":
            tensor = tile(-torch.exp(tensor), 0, 1)
        elif kind in ("ssm_dt", "ssm_alpha", "ssm_beta"):
            tensor = tile(tensor, 0, 1)
        elif kind == "attn_gate":
            tensor = tile(tensor, 0, d_v)
        elif kind == "ssm_out":
            tensor = tile(tensor, 1, d_v)
        elif kind in ("attn_qkv", "ssm_conv1d"):  # q and k rows (channels) as they are, then the value heads
            tensor = tensor.squeeze(1) if kind == "ssm_conv1d" else tensor
            qk = 2 * n_k * d_k
            tensor = torch.cat([tensor[:qk], tile(tensor[qk:], 0, d_v)])
        return [(target, tensor)]

    def gguf_hparams(self, cfg):
        rope = dict(cfg.rope_parameters or {})
        recurrent = [t == "linear_attention" for t in cfg.layer_types]
        return {**super().gguf_hparams(cfg),
                Keys.SSM.CONV_KERNEL: int(cfg.linear_conv_kernel_dim), Keys.SSM.STATE_SIZE: int(cfg.linear_key_head_dim),
                Keys.SSM.GROUP_COUNT: int(cfg.linear_num_key_heads),
                Keys.SSM.TIME_STEP_RANK: int(cfg.linear_num_value_heads),
                Keys.SSM.INNER_SIZE: int(cfg.linear_value_head_dim) * int(cfg.linear_num_value_heads),
                RECURRENT_LAYERS: recurrent,
                # llama.cpp reads it only without recurrent_layers: the first full-attention layer's number
                Keys.LLM.FULL_ATTENTION_INTERVAL: recurrent.index(False) + 1 if False in recurrent else len(recurrent),
                Keys.Rope.DIMENSION_COUNT: int(self._head_dim(cfg) * float(rope.get("partial_rotary_factor", 0.25))),
                Keys.Rope.DIMENSION_SECTIONS: self._mrope_sections(cfg)}

    def _head_dim(self, cfg):
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def _mrope_sections(self, cfg):
        """M-RoPE's (t, h, w) sections as llama.cpp takes them, 4 long (transformers' default [11, 11, 10], as the
        converter writes where the config has none). Text positions are equal in t, h and w: they rotate as RoPE."""
        sections = list(dict(cfg.rope_parameters or {}).get("mrope_section") or [11, 11, 10])
        return [int(s) for s in (sections + [0, 0, 0, 0])[:4]]

    def gguf_required(self, cfg):
        def name(t, bid=None, suffix=".weight"):
            return GGUF_TENSOR_NAMES[t].format(bid=bid) + suffix

        need = [name(GT.TOKEN_EMBD), name(GT.OUTPUT_NORM), name(GT.OUTPUT)]
        for i, kind in enumerate(cfg.layer_types):
            mixer = [GT.ATTN_Q, GT.ATTN_K, GT.ATTN_V, GT.ATTN_OUT, GT.ATTN_Q_NORM, GT.ATTN_K_NORM] \
                if kind == "full_attention" else \
                [GT.ATTN_QKV, GT.ATTN_GATE, GT.SSM_ALPHA, GT.SSM_BETA, GT.SSM_CONV1D, GT.SSM_NORM, GT.SSM_OUT]
            need += [name(t, i) for t in [GT.ATTN_NORM, GT.ATTN_POST_NORM, GT.FFN_GATE_INP, GT.FFN_GATE_INP_SHEXP,
                                          GT.FFN_GATE_SHEXP, GT.FFN_UP_SHEXP, GT.FFN_DOWN_SHEXP] + mixer]
            need += [self.gguf_expert_tensor_name(i, p) for p in PROJECTIONS]
            if kind != "full_attention":
                need += [name(GT.SSM_A, i, ""), name(GT.SSM_DT, i, ".bias")]
        return need

    def gguf_problems(self, cfg):
        problems = super().gguf_problems(cfg)
        if int(cfg.linear_key_head_dim) != int(cfg.linear_value_head_dim):
            problems.append(f"linear_key_head_dim={cfg.linear_key_head_dim} but linear_value_head_dim="
                            f"{cfg.linear_value_head_dim}: llama.cpp's 'qwen35moe' sizes the value heads by the key "
                            "heads' size")
        if int(cfg.linear_num_value_heads) % int(cfg.linear_num_key_heads):
            problems.append(f"linear_num_value_heads={cfg.linear_num_value_heads} is not a multiple of "
                            f"linear_num_key_heads={cfg.linear_num_key_heads}, which llama.cpp's graph broadcasts")
        if getattr(cfg, "attention_bias", False):
            problems.append("attention_bias=true, but llama.cpp's 'qwen35moe' loads no attention output bias")
        sections = self._mrope_sections(cfg)
        if sum(sections) > self._head_dim(cfg):
            problems.append(f"rope_parameters.mrope_section {sections[:3]} sums past head_dim={self._head_dim(cfg)}, "
                            "which llama.cpp's M-RoPE cannot apply (it aborts)")
        other = sorted(set(cfg.layer_types) - {"linear_attention", "full_attention"})
        if other:
            problems.append(f"layer_types {other}: llama.cpp's 'qwen35moe' has linear_attention and full_attention "
                            "layers only")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=top_k,
                    moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden // 2,
                    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=hidden // 4,
                    linear_value_head_dim=hidden // 4,
                    layer_types=[("full_attention" if i % 2 else "linear_attention") for i in range(layers)],
                    max_position_embeddings=1024, initializer_range=hidden ** -0.5,
                    # the release's interleaved M-RoPE, its sections sized to this head's rotary half (2 of 4 dims)
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                         mrope_section=[1, 1, 0], mrope_interleaved=True),
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      num_position_embeddings=64, patch_size=4)
        return dict(text_config=text, vision_config=vision, tie_word_embeddings=False)

    def tiny_model(self, config):
        from transformers.models.qwen3_5_moe import Qwen3_5MoeForConditionalGeneration

        return Qwen3_5MoeForConditionalGeneration(config)


def _tile_value_heads(t: torch.Tensor, dim: int, n_k: int, per_k: int, head: int) -> torch.Tensor:
    """`t` with its `dim` (n_k · per_k heads of `head` values, grouped by key head) reordered to tiled order."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], n_k, per_k, head, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


FAMILY = Qwen35MoeFamily()
