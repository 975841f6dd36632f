"""A run's LoRA alone as a llama.cpp LoRA adapter GGUF, laid out as llama.cpp's convert_lora_to_gguf.py writes
one: `general.type` adapter, `adapter.type` lora, `adapter.lora.alpha`, and a `.lora_a` [r, in] / `.lora_b`
[out, r] pair per base tensor it adapts — the per-expert LoRA of a layer stacked like the experts into
`blk.N.ffn_{gate,up,down}_exps.weight.lora_a` [E, r, in] / `.lora_b` [E, out, r]; q/k rows permuted where the
arch's GGUF permutes them. llama.cpp scales each pair by alpha / r (r from the tensor), as PEFT does.

A user keeps one GGUF of the base model (llama.cpp's convert_hf_to_gguf.py on the checkpoint, or
engine.export.write_gguf on it: their tensor names are the same) and loads adapters onto it:
`llama-cli -m base.gguf --lora adapter.gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..model.arch import ExpertKey
from ..io import atomic_path
from .gguf import GGUF_DTYPES, _encode, _permute_rope, llama_cpp_problems, rope_heads
from .errors import ExportError
from .peft_lora import PREFIX, peft_problems, peft_tensors
from .source import RunSource

PROJECTIONS = ("gate", "up", "down")
#: dtypes of the LoRA tensors (q8_0 is left out: a LoRA's rows are r long, rarely a multiple of its block)
LORA_DTYPES = ("f16", "bf16", "f32")


def gguf_lora_problems(src: RunSource) -> list[str]:
    """Why the run has no llama.cpp LoRA form (empty: it has one)."""
    problems = peft_problems(src)
    if not problems:
        problems += [f"llama.cpp: {p}" for p in llama_cpp_problems(src.hf_config, src.family)]
    plain = sorted({n.rsplit(".", 2)[-2] for n in src.attention_loras()} & set(src.family.gguf_lora_unsupported))
    if plain:
        problems.append(f"llama.cpp: its {src.family.gguf_arch!r} graph applies no LoRA adapter to the tensors of "
                        f"{', '.join(plain)} (routing.attention_lora adapts them; only o_proj's takes one), so the "
                        "adapter would be silently ignored there; export the merged model (--format gguf) instead")
    return problems


def gguf_lora_tensors(src: RunSource) -> dict[str, torch.Tensor]:
    """The run's LoRA under llama.cpp's names, in fp32 and numpy order: `blk.N.attn_q.weight.lora_a` [r, in],
    `.lora_b` [out, r]; experts stacked `blk.N.ffn_gate_exps.weight.lora_a` [E, r, in] / `.lora_b` [E, out, r]."""
    family, cfg = src.family, src.hf_config
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    peft = peft_tensors(src)
    for name, A in peft.items():
        if not name.endswith(".lora_A.weight"):
            continue
        stem = name.removesuffix(".lora_A.weight")
        B = peft[f"{stem}.lora_B.weight"]
        weight = stem.removeprefix(PREFIX) + ".weight"
        key = family.parse_expert_key(weight)
        if key is not None:
            experts.setdefault((key.layer, key.proj), {})[key.expert] = (A, B)
            continue
        target = family.gguf_tensor_name(weight)
        if target is None:
            raise ExportError(f"the run adapts {weight}, which has no llama.cpp tensor in {family.gguf_arch!r}.")
        heads = rope_heads(family, cfg, target)
        if heads:
            B = _permute_rope(B, heads)
        pairs[target] = {"lora_a": A, "lora_b": B}
    n_experts = family.num_experts(cfg)
    for (layer, proj), by_expert in experts.items():
        if sorted(by_expert) != list(range(n_experts)):
            raise ExportError(f"layer {layer} has LoRA on {len(by_expert)} of its {n_experts} experts' {proj} "
                              "projections; llama.cpp's stacked expert tensors need all of them.")
        target = family.gguf_expert_tensor_name(layer, proj)
        pairs[target] = {"lora_a": torch.stack([by_expert[e][0] for e in range(n_experts)]),
                         "lora_b": torch.stack([by_expert[e][1] for e in range(n_experts)])}
    return {f"{target}.{part}": t.float().contiguous()
            for target in sorted(pairs, key=_block_order) for part, t in sorted(pairs[target].items())}


def write_gguf_lora(src: RunSource, out_file: str | Path, dtype: str = "f16") -> dict[str, Any]:
    """Write the run's LoRA as a llama.cpp LoRA adapter GGUF (f16, bf16 or f32 tensors); returns a summary."""
    if dtype not in LORA_DTYPES:
        raise ExportError(f"export.dtype (--dtype) {dtype!r} is not allowed for --format gguf-lora; choose one of "
                          f"{', '.join(LORA_DTYPES)}.")
    problems = gguf_lora_problems(src)
    if problems:
        raise ExportError("this run has no llama.cpp LoRA form: " + "; ".join(problems) + ".")
    out_file = Path(out_file)
    tensors = gguf_lora_tensors(src)
    qtype = GGUF_DTYPES[dtype][0]
    writer = gguf.GGUFWriter(path=None, arch=src.family.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(src.run_dir.resolve().name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(src.cfg.adapter.alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in tensors.items():
        writer.add_tensor(name, _encode(name, t, qtype), raw_dtype=qtype)
    with atomic_path(out_file) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out_file), "arch": src.family.gguf_arch, "dtype": dtype, "alpha": float(src.cfg.adapter.alpha),
            "rank": src.cfg.adapter.rank, "tensors": len(tensors),
            "adapted": sorted({n.rsplit(".", 1)[0] for n in tensors}, key=_block_order),
            "bytes": out_file.stat().st_size}


def read_gguf_lora(path: str | Path, src: RunSource) -> dict[str, torch.Tensor]:
    """A LoRA adapter GGUF read back as PEFT tensors of the run's base (`base_model.model.<hub name>.lora_A.weight`
    [r, in] / `.lora_B.weight` [out, r], fp32): the inverse of gguf_lora_tensors, for the export's own check."""
    family, cfg = src.family, src.hf_config
    back: dict[str, str] = {}  # llama.cpp's name of each weight a LoRA may adapt -> hub name, or expert projection
    for weight in _hub_weights(src):
        key = family.parse_expert_key(weight)
        if key is None:
            back[family.gguf_tensor_name(weight)] = weight
        else:
            back[family.gguf_expert_tensor_name(key.layer, key.proj)] = key.proj
    out: dict[str, torch.Tensor] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        target, _, part = t.name.rpartition(".")
        data = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        data = data.reshape([int(d) for d in reversed(t.shape)])
        which = "A" if part == "lora_a" else "B"
        if target not in back:
            raise ExportError(f"{path}: tensor {t.name} adapts {target}, which the base model does not have.")
        if back[target] not in PROJECTIONS:
            heads = rope_heads(family, cfg, target)
            if which == "B" and heads:
                data = _unpermute_rope(data, heads)
            out[f"{PREFIX}{back[target].removesuffix('.weight')}.lora_{which}.weight"] = data
        else:
            layer = int(target.split(".")[1])
            for e in range(data.shape[0]):
                name = family.expert_key_name(ExpertKey(layer, e, back[target])).removesuffix(".weight")
                out[f"{PREFIX}{name}.lora_{which}.weight"] = data[e]
    return out


# ---- helpers ------------------------------------------------------------------------------------------------


def _hub_weights(src: RunSource) -> list[str]:
    """Hub names of the base's weights that a LoRA may adapt: attention and every expert projection."""
    from .peft_lora import hub_names

    names = [n for n in hub_names(src.base).values() if n.endswith(".weight")]
    names += [src.family.expert_key_name(ExpertKey(layer, e, p)) for layer in src.facts.moe_layers
              for e in range(src.facts.num_experts) for p in ("gate", "up", "down")]
    return [n for n in names if src.family.parse_expert_key(n) is not None or src.family.gguf_tensor_name(n)]


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of gguf._permute_rope: llama.cpp's interleaved q/k rows back to HF's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _block_order(name: str) -> tuple:
    """Sort key: by block number, then name (blk.2 before blk.10)."""
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" and parts[1].isdigit() else (-1, name)
