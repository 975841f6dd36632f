"""Quantising a checkpoint's experts while it streams, tensor by tensor: each expert is quantised as soon
as its projections are in, so host memory stays near the quantised size; a matching expert cache is used
instead, and a fresh quantisation is saved into it layer by layer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..io import atomic_write_json
from .expert_cache import MANIFEST, cache_folder, cache_key, load_cached_experts
from .hf_checkpoint import CheckpointError, read_config, read_tensors
from .stores import BLOCKSIZE, DenseExpertStore, ExpertStoreT, NF4ExpertStore, quantized_nbytes


def _fused_expert_regex(family):
    return family.fused_experts_regex()


def quantize_checkpoint_experts(path: str | Path, quant: str = "nf4", cache_dir: str | Path | None = None, *,
                                blocksize: int = BLOCKSIZE,
                                tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                                on_other: Callable[[str, torch.Tensor], None] | None = None,
                                device: torch.device | str | None = None) -> dict[int, ExpertStoreT]:
    """Stores of every MoE layer's experts (NF4 or bf16) built while streaming the checkpoint, tensor by tensor.

    Each expert is quantised as soon as its projections have arrived (the family's `parse_expert_key`,
    or already-fused `experts.gate_up_proj` / `down_proj`), so host memory holds the quantised experts
    plus a few tensors in flight. With `cache_dir` (NF4 only), a matching cache folder is loaded instead
    of quantising, each layer checked against the SHA-256 written with it; a layer that is damaged, has no
    checksum (an older cache) or is missing is quantised again (with a warning naming its file) and rewritten,
    reading only its own expert tensors. A fresh quantisation is saved there layer by layer. `tensors` replaces
    the reader (default: `read_tensors(path)`); `on_other(name, tensor)` receives every non-expert tensor. With
    `device` (a GPU), each matrix is quantised there — far faster than bitsandbytes' CPU path — and the
    stores still fill in host memory.
    """
    if quant not in ("nf4", "bf16"):
        raise ValueError(f"model.quant: {quant!r} is not allowed; choose nf4 or bf16.")
    config, family = read_config(path)
    facts = family.facts(config)
    fused_re = _fused_expert_regex(family)

    def is_expert(name: str) -> bool:
        return not family.skip_tensor(name, config) and (
            family.parse_expert_key(name) is not None or fused_re.fullmatch(family.rename(name)) is not None
            or family.raw_expert_layer(name) is not None)

    folder = cache_folder(path, cache_dir, quant, blocksize) if cache_dir is not None and quant == "nf4" else None
    cached = load_cached_experts(path, cache_dir, quant, blocksize) if folder is not None else None
    todo = set(facts.moe_layers) if cached is None else set(cached.redo)  # the layers to quantise now
    reasons: dict[str, list[int]] = {}
    for layer, why in sorted(cached.redo.items()) if cached is not None else ():
        reasons.setdefault(why, []).append(layer)
    for why, layers in reasons.items():  # one warning per cause (a damaged manifest stands for every layer)
        which = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers}"
        warnings.warn(f"expert cache: {why}; quantising {which} again from {path}", stacklevel=2)
    if not todo:
        if on_other is not None:
            for name, t in (read_tensors(path, lambda n: not is_expert(n)) if tensors is None else tensors):
                if not is_expert(name):
                    on_other(name, t)
        return dict(sorted(cached.stores.items()))

    def wanted(name: str) -> bool:  # a tensor to read: not an expert, or an expert of a layer quantised now
        if not is_expert(name):
            return True
        key, raw = family.parse_expert_key(name), family.raw_expert_layer(name)
        layer = key.layer if key is not None else raw if raw is not None else int(fused_re.fullmatch(family.rename(name))[1])
        return layer in todo

    H, I, E = facts.hidden_size, facts.expert_intermediate_size, facts.num_experts
    stores: dict[int, ExpertStoreT] = {}
    pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # gate / up halves waiting for each other
    saved: set[int] = set()

    def store_of(layer: int, dtype: torch.dtype, name: str) -> ExpertStoreT:
        if layer not in facts.moe_layers:
            raise CheckpointError(f"{path}: expert tensor {name!r} is for layer {layer}, which has no experts "
                                  f"(MoE layers: {list(facts.moe_layers)}).")
        if layer not in stores:
            stores[layer] = (NF4ExpertStore(E, H, I, dtype, blocksize) if quant == "nf4"
                             else DenseExpertStore.empty(E, H, I, torch.bfloat16))
        return stores[layer]

    def put(layer: int, expert: int, part: str, weight: torch.Tensor, name: str) -> None:
        store = store_of(layer, weight.dtype, name)
        if device is not None:
            weight = weight.to(device, non_blocking=True)
        if not 0 <= expert < E:
            raise CheckpointError(f"{path}: tensor {name!r} is expert {expert}, but the config has {E} experts.")
        try:
            store.set_part(expert, part, weight)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {name!r}: {e} Is config.json the one these weights were "
                                  "saved with?") from None
        if folder is not None and store.complete and layer not in saved:
            store.save(folder / f"layer-{layer:03d}")
            saved.add(layer)

    # hub-specific expert layouts (gpt-oss's MXFP4 blocks, fused transposed tensors) as per-expert projections
    source = family.convert_stream(read_tensors(path, wanted if cached is not None else None) if tensors is None
                                   else tensors)
    for name, t in source:
        if cached is not None and not wanted(name):
            continue  # an expert of a layer the cache holds intact
        if family.skip_tensor(name, config):
            if on_other is not None:
                on_other(name, t)  # a Multi-Token-Prediction layer's: the loader skips it, like its other tensors
            continue
        key = family.parse_expert_key(name)
        if key is not None:
            if key.proj == "down":
                put(key.layer, key.expert, "down", t, name)
                continue
            halves = pending.setdefault((key.layer, key.expert), {})
            halves[key.proj] = t
            if len(halves) == 2:
                del pending[(key.layer, key.expert)]
                put(key.layer, key.expert, "gate_up", torch.cat([halves["gate"], halves["up"]], dim=0), name)
            continue
        m = fused_re.fullmatch(family.rename(name))
        if m is not None:
            layer, part = int(m[1]), "gate_up" if m[2] == "gate_up_proj" else "down"
            if t.shape[0] != E:
                raise CheckpointError(f"{path}: fused tensor {name!r} holds {t.shape[0]} experts, the config {E}.")
            for e in range(E):
                put(layer, e, part, t[e], name)
            continue
        if on_other is not None:
            on_other(name, t)
    if pending:
        (layer, expert), halves = next(iter(pending.items()))
        raise CheckpointError(f"{path}: layer {layer} expert {expert} has only its {', '.join(halves)} projection; "
                              f"{len(pending)} experts lack gate or up. The checkpoint is incomplete.")
    missing_layers = [l for l in facts.moe_layers if l in todo and l not in stores]
    incomplete = {l: s.missing() for l, s in stores.items() if not s.complete}
    if missing_layers or incomplete:
        detail = f"layers {missing_layers} have no expert tensors" if missing_layers else ""
        for l, miss in list(incomplete.items())[:3]:
            detail += f"{'; ' if detail else ''}layer {l} lacks {len(miss)} expert matrices (e.g. {miss[:3]})"
        raise CheckpointError(f"{path}: the checkpoint's experts are incomplete: {detail}.")
    if cached is not None:
        stores.update(cached.stores)
    if folder is not None:
        atomic_write_json(folder / MANIFEST, {"key": cache_key(path, quant, blocksize), "layers": sorted(stores),
                                              "nbytes": quantized_nbytes(stores)})
    return dict(sorted(stores.items()))
