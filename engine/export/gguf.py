"""Write a HF MoE checkpoint directory as one GGUF file that llama.cpp (and Ollama, LM Studio) runs.

Tensors stream from the checkpoint one at a time (a layer's experts are held until its last expert
arrives, then stacked into llama.cpp's `[E, out, in]` tensors), so memory stays near one layer.
The file is written in two passes over the same code: first on meta tensors to lay out the header,
then on the real tensors. Names, hyperparameters and the checks of what llama.cpp can represent
come from each family module (`Family.gguf_*`); the GGUF format from the `gguf` package.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import gguf
import numpy as np
import torch

from ..model.arch import Family
from ..io import atomic_path
from .errors import ExportError
from .gguf_tokenizer import _add_tokenizer
from ..model import checkpoint_files, iter_tensors, read_config

Q = gguf.GGMLQuantizationType
#: dtype name -> (tensor type of the weight matrices, llama.cpp's file type)
GGUF_DTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
T = gguf.MODEL_TENSOR


def _names(*tensors: gguf.MODEL_TENSOR, suffix: str = r"\.weight") -> re.Pattern:
    """A pattern matching llama.cpp's names of these tensors in any block."""
    return re.compile("|".join(re.escape(gguf.TENSOR_NAMES[t]).replace(re.escape("{bid}"), r"\d+") + suffix
                               for t in tensors))


#: tensors llama.cpp keeps in F32 whatever the file type (as its converter does)
_F32_TENSORS = _names(T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP, T.SHORTCONV_CONV, T.SSM_CONV1D)
_ATTN_Q, _ATTN_K = _names(T.ATTN_Q, suffix=r"\.(weight|bias)"), _names(T.ATTN_K, suffix=r"\.(weight|bias)")
_TOKEN_EMBD, _OUTPUT = gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[T.OUTPUT] + ".weight"


def require_finite(name: str, written: torch.Tensor, dtype: str) -> None:
    """Raise ExportError naming tensor `name` when it holds NaN or inf as it is written (`written`: its values in
    the file's type `dtype`), so that no export of a broken model is ever reported as done."""
    finite = torch.isfinite(written)
    if bool(finite.all()):
        return
    raise ExportError(f"the exported tensor {name} holds {int((~finite).sum())} NaN or inf values in {dtype} "
                      "(from NaN / inf in the run, or values beyond what that type holds); nothing was written. "
                      "Check the run (moetune eval), or export with --dtype bf16 if the values are only too large "
                      "for f16.")


def write_gguf(hf_dir: str | Path, out_file: str | Path, dtype: str = "f16") -> dict[str, Any]:
    """Write the HF checkpoint at `hf_dir` as a GGUF file (f32, f16, bf16 or q8_0); returns a summary."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(GGUF_DTYPES)}.")
    if out_file.is_dir():
        raise ExportError(f"GGUF output {str(out_file)!r} is a directory; give a file path such as "
                          f"{str(out_file / 'model.gguf')!r}.")
    cfg, family = read_config(hf_dir)
    _check_supported(cfg, family)
    qtype, ftype = GGUF_DTYPES[dtype]

    writer = gguf.GGUFWriter(path=None, arch=family.gguf_arch)
    _add_hparams(writer, cfg, family, ftype, name=hf_dir.resolve().name)
    n_tokens = _add_tokenizer(writer, hf_dir, int(cfg.vocab_size))

    # pass 1: the layout, from shapes alone
    plan = []
    for name, meta in _gguf_tensors(family, cfg, _meta_tensors(hf_dir)):
        tensor_type = _tensor_type(name, meta.shape, qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        nbytes = meta.numel() // block * type_size
        writer.add_tensor_info(name, tuple(meta.shape), np.dtype(np.float32), nbytes, raw_dtype=tensor_type)
        plan.append((name, tuple(meta.shape), tensor_type))
    _check_complete(family, cfg, [p[0] for p in plan])

    # pass 2: the data, in the same order
    with atomic_path(out_file) as tmp:
        written = 0
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            tensors = _gguf_tensors(family, cfg, iter_tensors(hf_dir))
            for (name, tensor), (want, shape, tensor_type) in zip(tensors, plan):
                if name != want or tuple(tensor.shape) != shape:
                    raise ExportError(f"{hf_dir}: the checkpoint changed while it was being exported ({name} "
                                      f"{tuple(tensor.shape)} where {want} {shape} was planned); export again.")
                writer.write_tensor_data(_encode(name, tensor, tensor_type))
                written += 1
        finally:
            writer.close()
        if written != len(plan):
            raise ExportError(f"{hf_dir}: only {written} of {len(plan)} tensors could be read; export again.")

    types: dict[str, int] = {}
    for _, _, tensor_type in plan:
        types[tensor_type.name] = types.get(tensor_type.name, 0) + 1
    return {"path": str(out_file), "arch": family.gguf_arch, "family": family.model_type, "dtype": dtype,
            "tensors": len(plan), "tensor_types": types, "vocab": n_tokens,
            "params": sum(int(np.prod(s)) for _, s, _ in plan), "bytes": out_file.stat().st_size}


# ---- checks -----------------------------------------------------------------------------------------------


def llama_cpp_problems(cfg, family: Family) -> list[str]:
    """What in a config llama.cpp would compute differently from transformers (empty: a GGUF of it is faithful)."""
    if not family.gguf_arch:
        return [f"{family.title} has no llama.cpp architecture"]
    if family.gguf_missing:
        return [family.gguf_missing]
    problems = family.gguf_problems(cfg)
    if family.activation(cfg) != "silu":
        problems.append(f"hidden_act={family.activation(cfg)!r}, but llama.cpp's {family.gguf_arch!r} experts use "
                        "SiLU")
    return problems


def _check_supported(cfg, family: Family) -> None:
    if not family.gguf_arch:
        raise ExportError(f"{family.title} has no llama.cpp architecture; GGUF export is not available for it.")
    if family.gguf_missing:
        raise ExportError(f"{family.title}: {family.gguf_missing}.")
    problems = llama_cpp_problems(cfg, family)
    if problems:
        raise ExportError(f"this {family.title} checkpoint cannot run in llama.cpp as it runs in transformers: "
                          + "; ".join(problems) + ". A GGUF of it would compute a different model, so none is "
                          "written; use --format hf to export it for transformers.")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("truncate", True) is False:
        warnings.warn(f"{family.title} config has YaRN RoPE with truncate=false; llama.cpp always rounds YaRN's "
                      "correction range to whole dimensions (truncate=true), so some rotary frequencies differ "
                      "from transformers' and the GGUF's outputs drift from the HF model's.", stacklevel=3)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and not family.gguf_sliding_window:
        warnings.warn(f"{family.title} config has sliding_window={window}; llama.cpp's {family.gguf_arch!r} "
                      f"attends to the full context, so outputs differ on sequences longer than {window} tokens.",
                      stacklevel=3)


def _check_complete(family: Family, cfg, names: list[str]) -> None:
    """Every weight the family maps to llama.cpp is in the plan (a truncated checkpoint fails here)."""
    have = set(names)
    missing = [n for n in family.gguf_required(cfg) if n not in have]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ExportError(f"the checkpoint lacks tensors llama.cpp needs ({len(missing)}: {shown}); "
                          "is it a complete checkpoint of this config?")


# ---- tensors ----------------------------------------------------------------------------------------------


def _meta_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, meta tensor) of every checkpoint tensor, in iter_tensors' order, reading headers only."""
    from safetensors import safe_open

    for file in checkpoint_files(hf_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, torch.empty(f.get_slice(name).get_shape(), device="meta")


def _gguf_tensors(family: Family, cfg, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """llama.cpp's tensors from checkpoint tensors: renamed, q/k permuted where the arch needs it,
    per-expert projections stacked into [E, out, in] once a layer's last one arrives."""
    n_experts = family.num_experts(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    fused = family.fused_experts_regex()
    pending: dict[int, dict[tuple[str, int], torch.Tensor]] = {}  # layer -> (proj, expert) -> tensor
    seen: set[str] = set()
    for name, tensor in family.gguf_stream(tensors):  # hub-specific layouts as per-expert / plain tensors
        if family.skip_tensor(name, cfg):
            continue  # a Multi-Token-Prediction layer or a vision tower: not part of the model (nor of this GGUF)
        key = family.parse_expert_key(name)
        if key is not None:
            if not 0 <= key.expert < n_experts:
                raise ExportError(f"tensor {name!r} is expert {key.expert}, but the config has {n_experts} experts.")
            layer = pending.setdefault(key.layer, {})
            layer[(key.proj, key.expert)] = tensor
            if len(layer) == 3 * n_experts:
                for proj in ("gate", "up", "down"):
                    yield family.gguf_expert_tensor_name(key.layer, proj), torch.stack(
                        [layer[(proj, e)] for e in range(n_experts)])
                del pending[key.layer]
            continue
        m = fused.fullmatch(family.rename(name))
        if m is not None:  # transformers 5 fused layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            layer_idx = int(m[1])
            if m[2] == "down_proj":
                yield family.gguf_expert_tensor_name(layer_idx, "down"), tensor
            else:
                inter = tensor.shape[1] // 2
                yield family.gguf_expert_tensor_name(layer_idx, "gate"), tensor[:, :inter]
                yield family.gguf_expert_tensor_name(layer_idx, "up"), tensor[:, inter:]
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = family.gguf_tensor_name(name)
        if target is None:
            raise ExportError(f"checkpoint tensor {name!r} has no llama.cpp counterpart in {family.gguf_arch!r}; "
                              "is this a plain (merged) checkpoint of the family?")
        if target in seen:
            if tied and target == _OUTPUT:
                continue  # the tied head was already written from the embeddings
            raise ExportError(f"checkpoint tensor {name!r} appears twice.")
        heads = rope_heads(family, cfg, target)
        if heads:
            tensor = _permute_rope(tensor, heads)
        seen.add(target)
        yield from family.gguf_transform(cfg, target, tensor)
        if tied and target == _TOKEN_EMBD and _OUTPUT not in seen:
            seen.add(_OUTPUT)
            yield _OUTPUT, tensor
    if pending:
        layer, parts = next(iter(pending.items()))
        raise ExportError(f"layer {layer} has {len(parts)} of its {3 * n_experts} expert projections in the "
                          "checkpoint; is it complete?")


def rope_heads(family: Family, hf_config, target: str) -> int | None:
    """How many heads llama.cpp's tensor `target` (q or k, weight or bias) has its rows permuted by, when the
    family's GGUF permutes them (see _permute_rope); None for every other tensor."""
    if not family.gguf_permute_qk:
        return None
    if _ATTN_Q.fullmatch(target):
        return int(hf_config.num_attention_heads)
    if _ATTN_K.fullmatch(target):
        return int(hf_config.num_key_value_heads)
    return None


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from HF's rotate-half RoPE to llama.cpp's interleaved pairs (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_type(name: str, shape: torch.Size, qtype: Q) -> Q:
    """The GGUF type of one tensor: norms, biases, routers and 1-D tensors stay F32 (as llama.cpp's
    converter keeps them); Q8_0 falls back to F16 for rows that are not a multiple of its block."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if _F32_TENSORS.fullmatch(name):
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _encode(name: str, tensor: torch.Tensor, tensor_type: Q) -> np.ndarray:
    """The bytes of one tensor in its GGUF type; ExportError when it holds NaN or inf as written."""
    data = tensor.detach().to(torch.float32).contiguous()
    if tensor_type == Q.F32:
        out = data.numpy()
        written = data
    elif tensor_type == Q.F16:
        with np.errstate(over="ignore"):  # an overflow is inf, which require_finite names below
            out = data.numpy().astype(np.float16)
        written = torch.from_numpy(out)
    else:  # bf16 rounds within f32's range; q8_0 stores each block's largest |value| / 127 as an f16 scale
        out = gguf.quants.quantize(data.numpy(), tensor_type)
        written = data.to(torch.bfloat16) if tensor_type == Q.BF16 else (data.abs().amax() / 127).to(torch.float16)
    require_finite(name, written, tensor_type.name.lower())
    return out


# ---- metadata ---------------------------------------------------------------------------------------------


def _add_hparams(writer: gguf.GGUFWriter, cfg, family: Family, ftype: gguf.LlamaFileType, name: str) -> None:
    facts = family.facts(cfg)
    n_head = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    K = gguf.Keys
    own = family.gguf_hparams(cfg)  # the family's own values replace the generic ones of the same key
    values: dict[str, int | float | bool | list] = {
        K.LLM.BLOCK_COUNT: facts.num_layers, K.LLM.CONTEXT_LENGTH: int(cfg.max_position_embeddings),
        K.LLM.EMBEDDING_LENGTH: facts.hidden_size,
        K.Attention.HEAD_COUNT: n_head, K.Attention.HEAD_COUNT_KV: int(cfg.num_key_value_heads),
        K.Attention.KEY_LENGTH: head_dim, K.Attention.VALUE_LENGTH: head_dim, K.Rope.DIMENSION_COUNT: head_dim,
        K.Attention.LAYERNORM_RMS_EPS: own.get(K.Attention.LAYERNORM_RMS_EPS) or float(cfg.rms_norm_eps),
        K.LLM.VOCAB_SIZE: int(cfg.vocab_size),
        K.LLM.EXPERT_COUNT: facts.num_experts, K.LLM.EXPERT_USED_COUNT: facts.top_k,
        K.LLM.EXPERT_WEIGHTS_NORM: facts.norm_topk_prob,
        **own,
    }
    dense = getattr(cfg, "intermediate_size", None)  # none where every layer has experts (Qwen3.5's text config)
    if dense is not None and K.LLM.FEED_FORWARD_LENGTH not in values:
        values[K.LLM.FEED_FORWARD_LENGTH] = int(dense)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key, value in values.items():
        add = writer.add_array if isinstance(value, list) else writer.add_bool if isinstance(value, bool) else \
            writer.add_float32 if isinstance(value, float) else writer.add_uint32  # a list: one value per layer
        add(key.format(arch=family.gguf_arch), value)
    _add_rope(writer, cfg)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope(writer: gguf.GGUFWriter, cfg) -> None:
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        raise ExportError(f"RoPE scaling {kind!r} is not supported by the GGUF export (default, linear and yarn are).")


# ---- SentencePiece-style BPE (Llama, Mistral, Mixtral) --------------------------------------------------------


