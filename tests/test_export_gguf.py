"""GGUF export: the file reads back with llama.cpp's architecture, hyperparameters, tokenizer, tensor names,
shapes and types; llama.cpp (llama-cpp-python) continues prompts exactly as transformers does on the same
checkpoint, and tokenises text as the HF tokenizer does."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine.model.arch import ExpertKey, get_family
from engine.export import ExportError, write_gguf
from engine.model import iter_tensors, load_model, read_config

from .conftest import FAMILY_NAMES
from .tolerance import assert_logits_close

DTYPES = ["f32", "f16", "bf16", "q8_0"]
#: the families MoETune writes GGUF for (every family with a llama.cpp arch MoETune maps)
GGUF_FAMILIES = [f for f in FAMILY_NAMES if not get_family(f).gguf_missing]
#: llama.cpp's architecture of each family (src/llama-arch.cpp); Mixtral runs as llama with experts
ARCH = {"olmoe": "olmoe", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss",
        "ernie4_5_moe": "ernie4_5-moe", "granitemoe": "granitemoe", "granitemoehybrid": "granitehybrid",
        "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "glm4_moe": "glm4moe", "lfm2_moe": "lfm2moe",
        "qwen3_5_moe": "qwen35moe", "glm4_moe_lite": "deepseek2",
        "qwen3_next": "qwen3next"}
#: token-id prompts (no tokenizer in the loop), and how many tokens to continue each
PROMPTS = [[1, 40, 41, 300, 12, 77], [5, 100, 200, 300, 400], [1, 7]]
NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _field(reader, key):
    field = reader.get_field(key)
    assert field is not None, f"GGUF lacks {key}"
    return field.contents()


def expected_tensors(family: str, cfg) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensors for the family and their ggml shapes (ne order), as its load_arch_tensors asks."""
    fam = get_family(family)
    facts = fam.facts(cfg)
    h, v, e, i = facts.hidden_size, int(cfg.vocab_size), facts.num_experts, facts.expert_intermediate_size
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    hd = int(getattr(cfg, "head_dim", None) or h // n_head)
    out = {"token_embd.weight": (h, v), "output_norm.weight": (h,), "output.weight": (h, v)}
    if family == "ernie4_5_moe":
        return out | _ernie_tensors(cfg, facts)
    if family.startswith("deepseek") or family == "glm4_moe_lite":  # GLM-4.7-Flash: DeepSeek-V3's MLA and router
        return out | _deepseek_tensors(family, cfg, facts)
    if family == "glm4_moe":
        return out | _glm_tensors(cfg, facts)
    if family == "granitemoehybrid":
        return out | _granite_hybrid_tensors(cfg, facts)
    if family in ("qwen3_5_moe", "qwen3_next"):
        return out | _qwen35_tensors(cfg, facts, qwen3next=family == "qwen3_next")
    if family == "lfm2_moe":  # the final norm is token_embd_norm
        return {"token_embd.weight": (h, v), "token_embd_norm.weight": (h,), "output.weight": (h, v)} | \
            _lfm2_tensors(cfg, facts)
    for layer in range(facts.num_layers):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "attn_q.weight": (h, n_head * hd),
                    b + "attn_k.weight": (h, n_kv * hd), b + "attn_v.weight": (h, n_kv * hd),
                    b + "attn_output.weight": (n_head * hd, h), b + "ffn_norm.weight": (h,), **_experts(b, facts)})
        if family == "olmoe":  # q/k norms over the whole projection
            out.update({b + "attn_q_norm.weight": (h,), b + "attn_k_norm.weight": (h,)})
        if family == "qwen3_moe":  # q/k norms per head
            out.update({b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
        if family == "qwen2_moe":
            out.update({b + "attn_q.bias": (n_head * hd,), b + "attn_k.bias": (n_kv * hd,),
                        b + "attn_v.bias": (n_kv * hd,),
                        **_experts(b, facts, facts.shared_expert_intermediate_size, shared_gate=True)})
        if family == "gpt_oss":  # biases everywhere, attention sinks, the post-attention norm under its own name
            out[b + "post_attention_norm.weight"] = out.pop(b + "ffn_norm.weight")
            out.update({b + "attn_q.bias": (n_head * hd,), b + "attn_k.bias": (n_kv * hd,),
                        b + "attn_v.bias": (n_kv * hd,), b + "attn_output.bias": (h,), b + "attn_sinks.weight": (n_head,),
                        b + "ffn_gate_inp.bias": (e,), b + "ffn_gate_exps.bias": (i, e), b + "ffn_up_exps.bias": (i, e),
                        b + "ffn_down_exps.bias": (h, e)})
    return out


def _experts(b: str, facts, shared: int = 0, shared_gate: bool = False, bias: bool = False) -> dict:
    """llama.cpp's tensors of one MoE layer's FFN (ne order): the router and the stacked experts, plus the shared
    expert of `shared` units (with its own sigmoid gate) and exp_probs_b where the family has them."""
    h, e, i = facts.hidden_size, facts.num_experts, facts.expert_intermediate_size
    out = {b + "ffn_gate_inp.weight": (h, e), b + "ffn_gate_exps.weight": (h, i, e),
           b + "ffn_up_exps.weight": (h, i, e), b + "ffn_down_exps.weight": (i, h, e)}
    if shared:
        out.update({b + "ffn_gate_shexp.weight": (h, shared), b + "ffn_up_shexp.weight": (h, shared),
                    b + "ffn_down_shexp.weight": (shared, h)})
    if shared_gate:
        out[b + "ffn_gate_inp_shexp.weight"] = (h, 1)
    if bias:
        out[b + "exp_probs_b.bias"] = (e,)
    return out


def _dense(b: str, h: int, ff: int) -> dict:
    """llama.cpp's tensors of a dense layer's SwiGLU FFN (ne order)."""
    return {b + "ffn_gate.weight": (h, ff), b + "ffn_up.weight": (h, ff), b + "ffn_down.weight": (ff, h)}


def _ernie_tensors(cfg, facts) -> dict[str, tuple[int, ...]]:
    """llama.cpp's 'ernie4_5-moe' block tensors (ne order): a dense first layer, routed + shared experts and the
    correction bias as exp_probs_b (llama_model_ernie4_5::load_arch_tensors)."""
    h, s = facts.hidden_size, facts.shared_expert_intermediate_size
    q = kv = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * q, cfg.num_key_value_heads * kv
    out = {}
    for layer in range(facts.num_layers):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,), b + "attn_q.weight": (h, q),
                    b + "attn_k.weight": (h, kv), b + "attn_v.weight": (h, kv), b + "attn_output.weight": (q, h)})
        out.update(_experts(b, facts, s, bias=True) if layer in facts.moe_layers else
                   _dense(b, h, cfg.intermediate_size))
    return out


def _deepseek_tensors(family: str, cfg, facts) -> dict[str, tuple[int, ...]]:
    """llama.cpp's 'deepseek2' block tensors (ne order): MLA with kv_b split per head into k_b / v_b, a dense
    first layer, routed + shared experts, V3's exp_probs_b (llama_model_deepseek2::load_arch_tensors)."""
    h = facts.hidden_size
    heads, nope, rope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    kv, q = cfg.kv_lora_rank, cfg.q_lora_rank
    out = {}
    for layer in range(facts.num_layers):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,), b + "attn_kv_a_norm.weight": (kv,),
                    b + "attn_kv_a_mqa.weight": (h, kv + rope), b + "attn_k_b.weight": (nope, kv, heads),
                    b + "attn_v_b.weight": (kv, vd, heads), b + "attn_output.weight": (heads * vd, h)})
        if q:
            out.update({b + "attn_q_a.weight": (h, q), b + "attn_q_a_norm.weight": (q,),
                        b + "attn_q_b.weight": (q, heads * (nope + rope))})
        else:
            out[b + "attn_q.weight"] = (h, heads * (nope + rope))
        out.update(_experts(b, facts, facts.shared_expert_intermediate_size, bias=family != "deepseek_v2")
                   if layer in facts.moe_layers else _dense(b, h, cfg.intermediate_size))
    return out


def _glm_tensors(cfg, facts) -> dict[str, tuple[int, ...]]:
    """llama.cpp's 'glm4moe' block tensors (ne order): q/k/v with biases, per-head q/k norms, post_attention_norm,
    a dense first layer, routed + shared experts and exp_probs_b (llama_model_glm4_moe::load_arch_tensors)."""
    h, s = facts.hidden_size, facts.shared_expert_intermediate_size
    hd, q, kv = cfg.head_dim, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {}
    for layer in range(facts.num_layers):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "post_attention_norm.weight": (h,), b + "attn_q.weight": (h, q),
                    b + "attn_k.weight": (h, kv), b + "attn_v.weight": (h, kv), b + "attn_q.bias": (q,),
                    b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,), b + "attn_output.weight": (q, h),
                    b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
        out.update(_experts(b, facts, s, bias=True) if layer in facts.moe_layers else
                   _dense(b, h, cfg.intermediate_size))
    return out


def _granite_hybrid_tensors(cfg, facts) -> dict[str, tuple[int, ...]]:
    """llama.cpp's 'granitehybrid' block tensors (ne order): Mamba-2 layers (A and D [1, heads], the conv kernel
    [K, C], the gated norm per group) or attention layers, each with Granite's experts and the shared MLP as the
    shared expert (llama_model_granite_hybrid::load_arch_tensors)."""
    h = facts.hidden_size
    s, hd = facts.shared_expert_intermediate_size, facts.hidden_size // cfg.num_attention_heads
    heads, inner, groups, state = cfg.mamba_n_heads, cfg.mamba_expand * h, cfg.mamba_n_groups, cfg.mamba_d_state
    conv, kv = inner + 2 * groups * state, cfg.num_key_value_heads * hd
    out = {}
    for layer, kind in enumerate(cfg.layers_block_type):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,), **_experts(b, facts, s)})
        if kind == "full_attention":
            out.update({b + "attn_q.weight": (h, h), b + "attn_k.weight": (h, kv), b + "attn_v.weight": (h, kv),
                        b + "attn_output.weight": (h, h)})
        else:
            out.update({b + "ssm_in.weight": (h, inner + conv + heads),
                        b + "ssm_conv1d.weight": (cfg.mamba_d_conv, conv), b + "ssm_conv1d.bias": (conv,),
                        b + "ssm_dt.bias": (heads,), b + "ssm_a": (1, heads), b + "ssm_d": (1, heads), b + "ssm_norm.weight": (inner // groups, groups),
                        b + "ssm_out.weight": (inner, h)})
    return out


def _qwen35_tensors(cfg, facts, qwen3next: bool = False) -> dict[str, tuple[int, ...]]:
    """llama.cpp's 'qwen35moe' block tensors (ne order): Gated DeltaNet layers (qkv and the z gate, alpha / beta per
    value head, A and dt per value head, the conv kernel [K, C], the gated norm per head) or attention layers whose
    q also gives the output gate (2 × head_dim per head), each with the experts and the gated shared expert
    (llama_model_qwen35moe::load_arch_tensors). `qwen3next`: beta and alpha in one ssm_ba [H, 2 · n_v]."""
    h, s = facts.hidden_size, facts.shared_expert_intermediate_size
    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    n_v, key = cfg.linear_num_value_heads, cfg.linear_num_key_heads * cfg.linear_key_head_dim
    value = n_v * cfg.linear_value_head_dim
    out = {}
    for layer, kind in enumerate(cfg.layer_types):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "post_attention_norm.weight": (h,),
                    **_experts(b, facts, s, shared_gate=True)})
        if kind == "full_attention":
            out.update({b + "attn_q.weight": (h, 2 * heads * hd), b + "attn_k.weight": (h, kv * hd),
                        b + "attn_v.weight": (h, kv * hd), b + "attn_output.weight": (heads * hd, h),
                        b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
        else:
            out.update({b + "attn_qkv.weight": (h, 2 * key + value), b + "attn_gate.weight": (h, value),
                        b + "ssm_alpha.weight": (h, n_v), b + "ssm_beta.weight": (h, n_v), b + "ssm_a": (n_v,),
                        b + "ssm_dt.bias": (n_v,), b + "ssm_conv1d.weight": (cfg.linear_conv_kernel_dim, 2 * key + value),
                        b + "ssm_norm.weight": (cfg.linear_value_head_dim,), b + "ssm_out.weight": (value, h)})
            if qwen3next:
                del out[b + "ssm_alpha.weight"], out[b + "ssm_beta.weight"]
                out[b + "ssm_ba.weight"] = (h, 2 * n_v)
    return out


def _lfm2_tensors(cfg, facts) -> dict[str, tuple[int, ...]]:
    """llama.cpp's 'lfm2moe' block tensors (ne order): short-conv layers (the kernel [L, H]) or attention layers with
    per-head q/k norms, two kinds of FFN: dense first layers, then experts with exp_probs_b
    (llama_model_lfm2moe::load_arch_tensors)."""
    h = facts.hidden_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    out = {}
    for layer, kind in enumerate(cfg.layer_types):
        b = f"blk.{layer}."
        out.update({b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,)})
        if kind == "full_attention":
            out.update({b + "attn_q.weight": (h, h), b + "attn_k.weight": (h, kv), b + "attn_v.weight": (h, kv),
                        b + "attn_output.weight": (h, h), b + "attn_q_norm.weight": (hd,),
                        b + "attn_k_norm.weight": (hd,)})
        else:
            out.update({b + "shortconv.conv.weight": (cfg.conv_L_cache, h), b + "shortconv.in_proj.weight": (h, 3 * h),
                        b + "shortconv.out_proj.weight": (h, h)})
        out.update(_experts(b, facts, bias=True) if layer in facts.moe_layers else _dense(b, h, cfg.intermediate_size))
    return out


def _stays_f32(name: str, shape) -> bool:
    return len(shape) == 1 or name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight",
                                              "ffn_gate_inp_shexp.weight", "shortconv.conv.weight",
                                              "ssm_conv1d.weight")) \
        or not name.endswith(".weight")  # Mamba-2's A and D (ssm_a, ssm_d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_reads_back(tiny_checkpoint, tmp_path, family, dtype):
    from transformers import AutoTokenizer

    ckpt = tiny_checkpoint(family)
    cfg, fam = read_config(ckpt)
    facts = fam.facts(cfg)
    out = tmp_path / "model.gguf"
    summary = write_gguf(ckpt, out, dtype=dtype)
    reader = gguf.GGUFReader(out)
    arch = ARCH[family]

    assert _field(reader, "general.architecture") == arch == summary["arch"]
    assert summary["bytes"] == out.stat().st_size and summary["dtype"] == dtype
    hparams = {"block_count": facts.num_layers, "context_length": cfg.max_position_embeddings,
               "embedding_length": facts.hidden_size, "attention.head_count": cfg.num_attention_heads,
               "attention.head_count_kv": cfg.num_key_value_heads, "expert_count": facts.num_experts,
               "expert_used_count": facts.top_k}
    if family in ("olmoe", "mixtral", "granitemoe", "granitemoehybrid"):  # experts sized by feed_forward_length
        hparams["feed_forward_length"] = facts.expert_intermediate_size
    if family == "granitemoehybrid":  # KV heads per layer (0: a Mamba-2 layer), the SSM's sizes, RoPE off (NoPE)
        hparams.update({"attention.head_count_kv": [cfg.num_key_value_heads if t == "full_attention" else 0
                                                    for t in cfg.layers_block_type],
                        "expert_shared_feed_forward_length": facts.shared_expert_intermediate_size,
                        "ssm.conv_kernel": cfg.mamba_d_conv, "ssm.state_size": cfg.mamba_d_state,
                        "ssm.group_count": cfg.mamba_n_groups, "ssm.inner_size": cfg.mamba_expand * cfg.hidden_size,
                        "ssm.time_step_rank": cfg.mamba_n_heads, "rope.scaling.finetuned": False})
    if family.startswith("granitemoe"):  # the μP multipliers under llama.cpp's names (logits divided by logit_scale)
        for key, value in (("embedding_scale", cfg.embedding_multiplier), ("residual_scale", cfg.residual_multiplier),
                           ("attention.scale", cfg.attention_multiplier), ("logit_scale", cfg.logits_scaling)):
            assert _field(reader, f"{arch}.{key}") == pytest.approx(value), key
    if family in ("qwen2_moe", "qwen3_moe", "gpt_oss"):
        hparams["expert_feed_forward_length"] = facts.expert_intermediate_size
    if family == "gpt_oss":
        hparams["attention.sliding_window"] = cfg.sliding_window
    if family == "qwen2_moe":
        hparams["expert_shared_feed_forward_length"] = facts.shared_expert_intermediate_size
    if family == "ernie4_5_moe":  # the dense first layer's width, the experts', the shared experts' (both of them)
        hparams.update({"feed_forward_length": cfg.intermediate_size, "leading_dense_block_count": 1,
                        "expert_feed_forward_length": facts.expert_intermediate_size, "expert_shared_count": 2,
                        "expert_shared_feed_forward_length": 2 * facts.expert_intermediate_size,
                        "interleave_moe_layer_step": 1})
    if family.startswith("deepseek") or family == "glm4_moe_lite":  # MLA as llama.cpp's converter writes it
        hparams.update({"attention.head_count_kv": 1, "expert_feed_forward_length": facts.expert_intermediate_size,
                        "feed_forward_length": cfg.intermediate_size, "leading_dense_block_count": 1,
                        "expert_shared_count": cfg.n_shared_experts, "attention.kv_lora_rank": cfg.kv_lora_rank,
                        "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                        "attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                        "attention.value_length_mla": cfg.v_head_dim, "rope.dimension_count": cfg.qk_rope_head_dim,
                        "expert_gating_func": 1 if family == "deepseek_v2" else 2,
                        "attention.q_lora_rank": cfg.q_lora_rank or 0})
        assert _field(reader, f"{arch}.expert_weights_scale") == pytest.approx(cfg.routed_scaling_factor)
    if family == "glm4_moe":  # partial rotary: RoPE on the first half of each head
        hparams.update({"expert_feed_forward_length": facts.expert_intermediate_size, "leading_dense_block_count": 1,
                        "expert_shared_count": cfg.n_shared_experts, "expert_gating_func": 2,
                        "rope.dimension_count": cfg.head_dim // 2})
        assert _field(reader, f"{arch}.expert_weights_scale") == pytest.approx(cfg.routed_scaling_factor)
    if family == "lfm2_moe":  # KV heads per layer (0: a short-conv layer), the conv's reach, sigmoid gating
        hparams.update({"attention.head_count_kv": [cfg.num_key_value_heads if t == "full_attention" else 0
                                                    for t in cfg.layer_types],
                        "feed_forward_length": cfg.intermediate_size, "leading_dense_block_count": 1,
                        "expert_feed_forward_length": facts.expert_intermediate_size, "expert_gating_func": 2,
                        "shortconv.l_cache": cfg.conv_L_cache})
    if family in ("qwen3_5_moe", "qwen3_next"):  # the Gated DeltaNet's sizes, which layers are recurrent, partial RoPE
        hparams.update({"expert_feed_forward_length": facts.expert_intermediate_size,
                        "expert_shared_feed_forward_length": facts.shared_expert_intermediate_size,
                        "ssm.conv_kernel": cfg.linear_conv_kernel_dim, "ssm.state_size": cfg.linear_key_head_dim,
                        "ssm.group_count": cfg.linear_num_key_heads, "ssm.time_step_rank": cfg.linear_num_value_heads,
                        "ssm.inner_size": cfg.linear_num_value_heads * cfg.linear_value_head_dim,
                        "attention.recurrent_layers": [t == "linear_attention" for t in cfg.layer_types],
                        "full_attention_interval": cfg.layer_types.index("full_attention") + 1,
                        "rope.dimension_count": cfg.head_dim // 4})
        if family == "qwen3_5_moe":  # M-RoPE (qwen3next: plain RoPE, and the config's dense width, as its converter)
            hparams["rope.dimension_sections"] = cfg.rope_parameters["mrope_section"] + [0]
            assert reader.get_field(f"{arch}.feed_forward_length") is None  # no dense layers: no dense width
        else:
            hparams["feed_forward_length"] = cfg.intermediate_size
    for key, want in hparams.items():
        assert _field(reader, f"{arch}.{key}") == want, key
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    eps = getattr(cfg, "rms_norm_eps", None) or cfg.norm_eps  # LFM2 names it norm_eps
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(eps)
    assert _field(reader, f"{arch}.expert_weights_norm") == facts.norm_topk_prob

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    # which one: test_llama_cpp_tokenizes_like_hf (qwen35: transformers runs Qwen3.5's own tokenizer class)
    assert _field(reader, "tokenizer.ggml.pre") in (("qwen35",) if family == "qwen3_5_moe" else ("gpt-2", "qwen2"))
    assert len(tokens) == cfg.vocab_size == summary["vocab"]
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    n_merges = len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"])
    assert len(_field(reader, "tokenizer.ggml.merges")) == n_merges > 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == 2
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template

    want = expected_tensors(family, cfg)
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(want) and summary["tensors"] == len(want)
    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    for name, shape in want.items():
        assert tuple(int(n) for n in got[name].shape) == shape, name
        short = qtype == "Q8_0" and shape[0] % 32  # rows shorter than a q8_0 block stay f16 (MLA's k_b)
        assert got[name].tensor_type.name == ("F32" if _stays_f32(name, shape) else "F16" if short else qtype), name

    if dtype in ("f32", "f16"):  # experts are stacked in expert order, values intact
        hf = dict(fam.convert_stream(iter_tensors(ckpt)))  # per-expert projections (gpt-oss's hub layout is fused)
        last = facts.num_layers - 1
        down = np.asarray(got[f"blk.{last}.ffn_down_exps.weight"].data, dtype=np.float32)
        ref = torch.stack([hf[fam.expert_key_name(ExpertKey(last, ex, "down"))] for ex in range(facts.num_experts)])
        np.testing.assert_allclose(down, ref.numpy(), atol=0 if dtype == "f32" else 1e-3)


def test_bad_dtype_is_a_clear_error(tiny_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    with pytest.raises(ExportError, match=r"'q4_k'.*f32, f16, bf16, q8_0"):
        write_gguf(tiny_checkpoint("olmoe"), out, dtype="q4_k")
    assert list(tmp_path.iterdir()) == []


def _copy(src: Path, dst: Path, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        for key, value in edit_config.items():  # a dict edits that section (a multimodal config's text_config)
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family,edit,message", [
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    ("qwen2_moe", {"decoder_sparse_step": 2}, "needs experts in every layer"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("gpt_oss", {"swiglu_limit": 5.0}, "hard-codes alpha 1.702 and limit 7.0"),
    ("ernie4_5_moe", {"moe_layer_interval": 2}, "loads experts in every layer from moe_layer_start_index on"),
    ("ernie4_5_moe", {"use_bias": True}, "applies no biases to the MLPs"),
    ("lfm2_moe", {"routed_scaling_factor": 2.0}, "does not scale the gates"),
    ("lfm2_moe", {"conv_bias": True}, "applies no biases to the short convolutions"),
    ("qwen3_5_moe", {"text_config": {"linear_value_head_dim": 32}}, "sizes the value heads by the key heads' size"),
    ("qwen3_5_moe", {"text_config": {"attention_bias": True}}, "loads no attention output bias"),
    ("qwen3_5_moe", {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                          "mrope_section": [11, 11, 10]}}}, "sums past head_dim=16"),
    ("qwen3_next", {"norm_topk_prob": False}, "norm_topk_prob=False"),  # llama.cpp renormalises, always
])
def test_config_llama_cpp_cannot_run_is_refused(tiny_checkpoint, tmp_path, family, edit, message):
    ckpt = _copy(tiny_checkpoint(family), tmp_path / "ckpt", edit)
    with pytest.raises(ExportError, match=message):
        write_gguf(ckpt, tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_incomplete_checkpoint_is_refused_and_nothing_written(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(tiny_checkpoint("qwen2_moe"), tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="layer 1 has 11 of its 12 expert projections"):
        write_gguf(ckpt, out / "model.gguf")
    assert list(out.iterdir()) == []


# ---- llama.cpp runs the file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp runs only in a child process (engine.export.llama_child): a native crash fails one test, not the suite."""
    from engine.export import llama_child

    if not llama_child.llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    return llama_child


@pytest.fixture(scope="module")
def sharp_checkpoint(tiny_checkpoint, tmp_path_factory):
    """Factory: the family's tiny checkpoint with its block weights rescaled to std 1/sqrt(fan_in).

    At a small init scale (transformers' default 0.02) the blocks barely move the residual stream, so a wrong
    export (gate and up swapped, q/k not permuted) can still give the same greedy tokens; at this scale every
    such error changes the continuations, whatever scale engine.model.tiny uses
    (test_llama_cpp_check_detects_a_wrong_export keeps that true)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = _sharpen(_copy(tiny_checkpoint(family), tmp_path_factory.mktemp("sharp") / family))
        return cache[family]

    return make


def _sharpen(ckpt: Path) -> Path:
    """Rescale a checkpoint's block weights (in place) to std 1/sqrt(fan_in); see sharp_checkpoint."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    for name, w in state.items():
        if w.ndim == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight", ".gate.weight",
                                              "e_score_correction_bias")):
            state[name] = w * (w.shape[1] ** -0.5 / w.std())
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation and the logits that chose each token."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            row = model(torch.tensor([ids])).logits[0, -1]
            logits.append(row.numpy())
            ids.append(int(row.argmax()))
    return ids[len(prompt):], np.stack(logits)


def cpp_greedy(llama_cpp, path: Path, prompts: list[list[int]], **options) -> list[tuple[list[int], np.ndarray]]:
    """llama.cpp's greedy continuation of each prompt and the logits that chose each token (f32 KV cache, so
    an f32 file computes in f32 throughout), in a child process."""
    return llama_cpp.run_llama(path, [("greedy", p, NEW_TOKENS) for p in prompts], **options)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llama_cpp_greedy_matches_transformers(llama_cpp, sharp_checkpoint, tmp_path, family):
    ckpt = sharp_checkpoint(family)
    model = load_model(ckpt).model
    write_gguf(ckpt, tmp_path / "model.gguf", dtype="f32")
    for prompt, (got, got_logits) in zip(PROMPTS, cpp_greedy(llama_cpp, tmp_path / "model.gguf", PROMPTS)):
        want, want_logits = _hf_greedy(model, prompt)
        assert got == want, f"prompt {prompt}: llama.cpp continued {got}, transformers {want}"
        assert_logits_close(got_logits, want_logits, what=f"prompt {prompt}")


#: the relative rounding of each file type: f16's and bf16's unit roundoff; q8_0 rounds weights and (in its
#: vec_dot) activations to 8-bit steps of their block's largest value
_UNIT = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 2.0 ** -7}
#: how far llama.cpp's logits may sit from transformers' f32 ones, per position (max over the vocabulary) as a
#: fraction of the logits' standard deviation: the median position 32 units of the file type's rounding
#: (measured 6-10), any position 1.5 (a token whose top-k experts flip under rounding moves more; measured up
#: to 0.6). A wrong tensor mapping moves every position by ≈ 3.
_MEDIAN_UNITS, _MAX_ERR = 32, 1.5


def _teacher_forced_errors(llama_cpp, model, path: Path, **options) -> np.ndarray:
    """Per position along transformers' own continuation of each prompt (so near-ties cannot diverge), the
    largest |llama.cpp − transformers| logit over the vocabulary, over the std of transformers' logits."""
    runs, wants = [], []
    for prompt in PROMPTS:
        ids = prompt + _hf_greedy(model, prompt)[0]
        with torch.no_grad():
            wants.append(model(torch.tensor([ids])).logits[0].numpy()[len(prompt) - 1:])
        runs.append(("logits", ids))
    gots = llama_cpp.run_llama(path, runs, **options)
    return np.concatenate([np.abs(got[len(p) - 1:] - want).max(-1) / want.std()
                           for p, got, want in zip(PROMPTS, gots, wants)])


@pytest.mark.parametrize("dtype", list(_UNIT))
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llama_cpp_runs_reduced_precision_close_to_transformers(llama_cpp, sharp_checkpoint, tmp_path, family,
                                                                dtype):
    ckpt = sharp_checkpoint(family)
    model = load_model(ckpt).model
    write_gguf(ckpt, tmp_path / "model.gguf", dtype=dtype)
    known = None
    try:
        errors = _teacher_forced_errors(llama_cpp, model, tmp_path / "model.gguf")
    except llama_cpp.LlamaCppCrash as crash:
        known = llama_cpp.known_crash(crash, dtype)
        if known is None:
            raise
        # llama.cpp's bug, not the file's: with its AMX / repacked kernels off the same file must be right
        errors = _teacher_forced_errors(llama_cpp, model, tmp_path / "model.gguf", repack=False)
    assert np.median(errors) < _MEDIAN_UNITS * _UNIT[dtype] and errors.max() < _MAX_ERR, errors.round(3)
    if known:
        pytest.xfail(known)


def test_llama_cpp_check_detects_a_wrong_export(llama_cpp, sharp_checkpoint, tmp_path, monkeypatch):
    """Without the q/k permutation llama's interleaved RoPE is applied to the wrong pairs: the comparisons
    above must see that (so they are not vacuous on these tiny models)."""
    ckpt = sharp_checkpoint("mixtral")
    model = load_model(ckpt).model
    monkeypatch.setattr(get_family("mixtral"), "gguf_permute_qk", False)
    write_gguf(ckpt, tmp_path / "model.gguf", dtype="f32")
    results = [(_hf_greedy(model, p), got) for p, got in zip(PROMPTS, cpp_greedy(llama_cpp, tmp_path / "model.gguf",
                                                                                 PROMPTS))]
    assert any(want[0] != got[0] for want, got in results)
    assert all(np.abs(want[1][0] - got[1][0]).max() > 0.05 for want, got in results)
    errors = _teacher_forced_errors(llama_cpp, model, tmp_path / "model.gguf")
    assert np.median(errors) > 10 * _MEDIAN_UNITS * _UNIT["bf16"], errors.round(3)


def test_tied_embeddings_export_runs(llama_cpp, sharp_checkpoint, tmp_path):
    """A checkpoint with tied embeddings (no lm_head tensor) gets llama.cpp's required `output` from them."""
    from safetensors.torch import load_file, save_file

    ckpt = _copy(sharp_checkpoint("olmoe"), tmp_path / "ckpt", {"tie_word_embeddings": True})
    state = load_file(str(ckpt / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(ckpt).model
    write_gguf(ckpt, tmp_path / "model.gguf", dtype="f32")
    for prompt, (got, _) in zip(PROMPTS, cpp_greedy(llama_cpp, tmp_path / "model.gguf", PROMPTS)):
        assert got == _hf_greedy(model, prompt)[0]


def test_fused_expert_layout_exports_the_same_file(tiny_checkpoint, tmp_path):
    """transformers 5's fused names (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) give the
    same tensors as the hub's per-expert names."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("mixtral")
    fam = get_family("mixtral")
    fused = _copy(src, tmp_path / "fused")
    state, pieces = {}, {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        key = fam.parse_expert_key(name)
        if key is None:
            state[name] = tensor
        else:
            pieces[(key.layer, key.proj, key.expert)] = tensor
    n = fam.num_experts(read_config(src)[0])
    for layer in sorted({k[0] for k in pieces}):
        stack = {p: torch.stack([pieces[(layer, p, e)] for e in range(n)]) for p in ("gate", "up", "down")}
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = stack["down"]
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    write_gguf(src, tmp_path / "a.gguf", dtype="f32")
    write_gguf(fused, tmp_path / "b.gguf", dtype="f32")
    a = {t.name: t for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


# ---- llama.cpp tokenises as the HF tokenizer does ----------------------------------------------------------

TEXTS = ["Hello world", "The quick brown fox jumps over 3 lazy dogs.", "What is 52 + 578? The answer is 630.",
         "  two  spaces,\ttab\n\nnew lines\n", "I've been 'told' he's there 12345 3.14", "café naïve — 東京 🚀",
         "trailing space ", "### Response:\n(answer) I'M DONE", "<|im_start|>user\nhi there<|im_end|>\n"]


def _trained_tokenizer(style: str):
    """A byte-level BPE in GPT-2's style (ByteLevel regex) or Qwen2's (split regex, then ByteLevel); the
    Qwen2 one is trained on extra lines so that some of its tokens cross GPT-2's pre-token boundaries
    (':\\n', '(answer', "'M"), which makes a wrong `tokenizer.ggml.pre` visible."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.export.gguf_tokenizer import _SPLIT_PRE
    from engine.model.tiny import CHAT_TEMPLATE, CORPUS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    lines = CORPUS.read_text().splitlines()
    if style == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        regex = next(r for r, name in _SPLIT_PRE.items() if name == "qwen2")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        lines += ["### Response:\n(answer) I'M DONE"] * 200
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.mark.parametrize("style", ["tiny", "gpt-2", "qwen2", "qwen35"])
def test_llama_cpp_tokenizes_like_hf(llama_cpp, tiny_checkpoint, tmp_path, style):
    """`qwen35`: the tiny tokenizer in a Qwen3.5 checkpoint, which transformers runs through its Qwen3_5Tokenizer
    (Qwen3.5's own split regex, whatever tokenizer.json says): the GGUF names llama.cpp's 'qwen35' for it."""
    from transformers import AutoTokenizer

    ckpt = _copy(tiny_checkpoint("qwen3_5_moe" if style == "qwen35" else "qwen3_moe"), tmp_path / "ckpt")
    if style in ("gpt-2", "qwen2"):  # the shipped tiny tokenizer, or one trained here in a given style
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (ckpt / f).unlink()
        _trained_tokenizer(style).save_pretrained(ckpt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_gguf(ckpt, tmp_path / "model.gguf")
    # Qwen3_5Tokenizer normalises to NFC, llama.cpp does not: the export says so (and the caveat holds, below)
    assert any("normalises text in transformers" in str(w.message) for w in caught) == (style == "qwen35")
    pre = _field(gguf.GGUFReader(tmp_path / "model.gguf"), "tokenizer.ggml.pre")
    assert style == "tiny" or pre == style
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    ids = [hf.encode(text, add_special_tokens=False) for text in TEXTS]
    got = _vocab_ops(llama_cpp, tmp_path / "model.gguf", TEXTS, ids, "detokenize")
    for text, want, (plain, with_bos, back) in zip(TEXTS, ids, got):
        assert plain == want, text
        # llama.cpp's own special-token policy (add_bos) gives what the HF tokenizer gives by default
        assert with_bos == hf(text)["input_ids"], text
        assert back == hf.decode(want) == text
    if style == "qwen35":
        decomposed = "e\u0301clair"  # 'éclair' with the accent as a combining mark, which NFC composes
        assert llama_cpp.run_llama(tmp_path / "model.gguf", [("tokenize", decomposed, False)], vocab_only=True) != \
            [hf.encode(decomposed, add_special_tokens=False)]


def _vocab_ops(llama_cpp, path: Path, texts: list[str], ids: list[list[int]], detokenize: str) -> list[tuple]:
    """For each text: llama.cpp's tokens without and with its BOS policy, and its detokenisation of `ids`."""
    ops = [op for text, i in zip(texts, ids) for op in
           (("tokenize", text, False), ("tokenize", text, True), (detokenize, i))]
    out = llama_cpp.run_llama(path, ops, vocab_only=True)
    return [tuple(out[k:k + 3]) for k in range(0, len(out), 3)]


# ---- SentencePiece-style BPE (Llama / Mistral / Mixtral tokenizers) ----------------------------------------

#: texts on which llama.cpp's highest-score-first joining needs the right scores to equal BPE (with equal scores,
#: as the gguf package's LlamaHfVocab writes, it tokenises these two differently)
SCORE_TEXTS = ["Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.", "A small child writes the red door."]
#: text prompts for the greedy comparison, tokenised by each side's own tokenizer
SPM_PROMPTS = [SCORE_TEXTS[1], "What is 52 + 578?", "café\nnew lines"]


@pytest.fixture(scope="module")
def spm_checkpoint(tmp_path_factory):
    """A tiny Mixtral with Llama's kind of tokenizer (`moetune tiny-model --tokenizer spm`), weights sharpened."""
    from engine.cli import main

    out = tmp_path_factory.mktemp("spm") / "mixtral"
    assert main(["tiny-model", "--family", "mixtral", "--out", str(out), "--tokenizer", "spm"]) == 0
    return _sharpen(out)


def test_spm_tokenizer_round_trips_text(spm_checkpoint):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(spm_checkpoint))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, None)
    assert hf.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    for text in TEXTS[:-1]:  # the last one has special tokens, after which a '▁' goes (Llama's legacy way)
        ids = hf(text)["input_ids"]
        assert ids[0] == hf.bos_token_id and hf.decode(ids, skip_special_tokens=True) == text, text
    assert hf.convert_ids_to_tokens(hf.encode("東", add_special_tokens=False)) == ["▁", "<0xE6>", "<0x9D>", "<0xB1>"]


def test_spm_gguf_reads_back(spm_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    summary = write_gguf(spm_checkpoint, tmp_path / "model.gguf", dtype="f16")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    hf = AutoTokenizer.from_pretrained(str(spm_checkpoint))
    n = len(hf)
    assert _field(reader, "tokenizer.ggml.model") == "llama" and summary["vocab"] == n
    assert reader.get_field("tokenizer.ggml.merges") is None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == hf.convert_ids_to_tokens(list(range(n)))
    T = gguf.TokenType
    types = [T(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    chat = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # <unk> a CONTROL token, as llama.cpp's converter types it from tokenizer.json (tests/test_gguf_tokenizer.py)
    want = {0: T.CONTROL, 1: T.CONTROL, 2: T.CONTROL, chat[0]: T.CONTROL, chat[1]: T.CONTROL}
    want |= {i: T.BYTE for i in range(3, 259)}
    assert types == [want.get(i, T.NORMAL) for i in range(n)]
    assert all(tokens[i] == f"<0x{i - 3:02X}>" for i in range(3, 259))

    # llama.cpp joins the pair whose piece scores highest; transformers the pair whose merge ranks first
    scores = _field(reader, "tokenizer.ggml.scores")
    assert len(scores) == n and all(scores[i] == 0 for i in range(259))
    first_rank: dict[str, int] = {}
    for rank, (a, b) in enumerate(json.loads((spm_checkpoint / "tokenizer.json").read_text())["model"]["merges"]):
        first_rank.setdefault(a + b, rank)
    merged = [i for i in range(n) if tokens[i] in first_rank]
    assert len(merged) > 100
    assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: first_rank[tokens[i]])
    singles = [i for i in range(n) if types[i] == T.NORMAL and i not in merged]
    assert max(scores[i] for i in singles) < min(scores[i] for i in merged)

    assert (_field(reader, "tokenizer.ggml.unknown_token_id"), _field(reader, "tokenizer.ggml.bos_token_id"),
            _field(reader, "tokenizer.ggml.eos_token_id")) == (0, 1, 2)
    assert reader.get_field("tokenizer.ggml.padding_token_id") is None
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    # as the converter: no key where llama.cpp's SentencePiece defaults (no EOS added, a '▁' prepended) hold
    assert reader.get_field("tokenizer.ggml.add_eos_token") is None
    assert reader.get_field("tokenizer.ggml.add_space_prefix") is None
    assert _field(reader, "tokenizer.chat_template") == hf.chat_template


def test_llama_cpp_tokenizes_spm_like_hf(llama_cpp, spm_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer.json made from SentencePiece exports without a caveat
        write_gguf(spm_checkpoint, tmp_path / "model.gguf")
    hf = AutoTokenizer.from_pretrained(str(spm_checkpoint))
    texts = TEXTS + SCORE_TEXTS + ["", "<s>x</s>"]
    ids = [hf.encode(text, add_special_tokens=False) for text in texts]
    # llama_detokenize drops the prefix space llama.cpp adds, as its common_detokenize does
    got = _vocab_ops(llama_cpp, tmp_path / "model.gguf", texts, ids, "detokenize_raw")
    for text, want, (plain, with_bos, back) in zip(texts, ids, got):
        assert plain == want, text
        assert with_bos == hf(text)["input_ids"], text
        assert back == hf.decode(want), text


def _metaspace(spec: dict) -> None:
    """The newer form of Llama's and Mistral's tokenizer.json: no normalizer, a Metaspace pre-tokenizer."""
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}


def test_metaspace_tokenizer_exports_with_its_caveat(llama_cpp, spm_checkpoint, tmp_path):
    """transformers' Metaspace (prepend_scheme 'first', what legacy=False writes) puts no '▁' before text that
    starts with a space or follows a special token, where SentencePiece and llama.cpp do: the export says so,
    and llama.cpp tokenises every other text as transformers does."""
    from transformers import AutoTokenizer

    ckpt = _edit_tokenizer(_copy(spm_checkpoint, tmp_path / "ckpt"), _metaspace)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    with pytest.warns(UserWarning, match="starts with a space or follows a special token"):
        write_gguf(ckpt, tmp_path / "model.gguf")
    assert gguf.GGUFReader(tmp_path / "model.gguf").get_field("tokenizer.ggml.add_space_prefix") is None  # default on
    got = llama_cpp.run_llama(tmp_path / "model.gguf", [("tokenize", text, True) for text in TEXTS], vocab_only=True)
    for text, tokens in zip(TEXTS, got):
        caveat = text.startswith(" ") or text.startswith("<|im_start|>")
        assert (tokens == hf(text)["input_ids"]) != caveat, text


def test_llama_cpp_greedy_matches_transformers_with_spm_tokenizer(llama_cpp, spm_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(spm_checkpoint))
    model = load_model(spm_checkpoint).model
    write_gguf(spm_checkpoint, tmp_path / "model.gguf", dtype="f32")
    prompts = llama_cpp.run_llama(tmp_path / "model.gguf", [("tokenize", t, True) for t in SPM_PROMPTS],
                                  vocab_only=True)
    assert prompts == [hf(text)["input_ids"] for text in SPM_PROMPTS]
    for text, prompt, (got, got_logits) in zip(SPM_PROMPTS, prompts, cpp_greedy(llama_cpp, tmp_path / "model.gguf",
                                                                                 prompts)):
        want, want_logits = _hf_greedy(model, prompt)
        assert got == want, f"{text!r}: llama.cpp continued {got}, transformers {want}"
        assert_logits_close(got_logits, want_logits, what=repr(text))


def _edit_tokenizer(ckpt: Path, edit) -> Path:
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    edit(spec)
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    return ckpt


def _unigram(spec: dict) -> None:
    spec["model"] = {"type": "Unigram", "unk_id": 0, "byte_fallback": True,
                     "vocab": [[t, 0.0] for t in sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)]}


def _nfkc(spec: dict) -> None:
    spec["normalizer"]["normalizers"].insert(0, {"type": "NFKC"})


@pytest.mark.parametrize("edit,message", [(_unigram, r"is a Unigram tokenizer.*convert_hf_to_gguf"),
                                          (_nfkc, r"normalizer step \{\"type\": \"NFKC\"\}.*convert_hf_to_gguf")])
def test_tokenizer_llama_cpp_cannot_run_is_refused(spm_checkpoint, tmp_path, edit, message):
    ckpt = _edit_tokenizer(_copy(spm_checkpoint, tmp_path / "ckpt"), edit)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match=message):
        write_gguf(ckpt, out / "model.gguf")
    assert list(out.iterdir()) == []


def test_bpe_without_sentencepiece_merges_is_flagged(spm_checkpoint, tmp_path):
    """A byte-fallback BPE lacking a merge of two pieces that make a third: llama.cpp's SentencePiece tokenizer
    joins them anyway, so the export warns and names the pair."""
    def drop_first_merge(spec: dict) -> None:
        del spec["model"]["merges"][0]

    first = json.loads((spm_checkpoint / "tokenizer.json").read_text())["model"]["merges"][0]
    ckpt = _edit_tokenizer(_copy(spm_checkpoint, tmp_path / "ckpt"), drop_first_merge)
    with pytest.warns(UserWarning, match=rf"1 pairs of pieces .*\({first[0]!r}\+{first[1]!r}\)"):
        write_gguf(ckpt, tmp_path / "model.gguf")
