"""Frozen expert weights in NF4 (bitsandbytes, double quantisation, blocksize 64) or bf16, one store
per MoE layer, and the streaming quantiser that builds the stores from a checkpoint tensor by tensor.

- `NF4ExpertStore`: each expert's `gate_up [2I, H]` (rows: gate then up, transformers 5 layout) and
  `down [H, I]` quantised separately with `bitsandbytes.functional.quantize_4bit`; the quantised
  tensors of all experts are stacked (`[E, ...]`), so one expert is a set of views. `weights(e,
  device, dtype)` dequantises on `device` with bitsandbytes' own `dequantize_4bit` (exactly what
  bitsandbytes returns for the same quant state). It is also a host store for `engine.offload`
  (`expert_tensors`, `weights_from_tensors`).
- `DenseExpertStore`: the same interface over bf16/fp32 fused tensors (views, no copy).
- `quantize_checkpoint_experts`: reads a checkpoint without memory-mapping it (`read_tensors`),
  quantises each expert as soon as its projections are in, and keeps or reuses a cache folder of
  quantised experts keyed by the checkpoint's identity, so peak host memory stays near the quantised
  size and a second run skips the quantisation.
- `quantize_linear_layers`: QLoRA-style NF4 storage (bnb `Linear4bit`) for the other frozen linear
  layers (attention q/k/v/o, shared experts, dense MLPs), never `lm_head` or routers.

Store files (`save(dir)`): `experts.safetensors` (the stacked tensors) and `experts.json` (format,
shapes, quant settings, the tensor file's size and SHA-256), each written atomically, JSON last; `load`
checks both, so a damaged cache layer is quantised again, never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from .io import DamagedFileError, atomic_path, atomic_write_json, sha256_file
from .loader import CheckpointError, base_identity, checkpoint_files, read_config

#: bitsandbytes settings of every NF4 tensor MoETune writes
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for the double-quantised absmax
QUANT_TYPE = "nf4"
PARTS = ("gate_up", "down")
STORE_FILE, STORE_META = "experts.safetensors", "experts.json"
MANIFEST = "manifest.json"
#: bump when the layout of stored quantised experts changes (old cache folders are then ignored)
FORMAT_VERSION = 1


class QuantCacheError(DamagedFileError):
    """A saved expert store that cannot be read back: missing, truncated, bytes changed, or of another format."""


def nf4_nbytes(numel: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes of one NF4 matrix with double quantisation: packed 4-bit codes, 8-bit absmax per block,
    fp32 second-level absmax per 256 blocks, fp32 offset (the 16 + 256-entry code tables not included)."""
    blocks = math.ceil(numel / blocksize)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4


#: bytes of the two code tables (NF4 levels, dynamic map of the nested absmax) a store keeps once
CODE_TABLE_BYTES = 4 * (16 + 256)


def nf4_expert_nbytes(hidden_size: int, intermediate_size: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes of one expert in NF4: gate_up [2I, H] and down [H, I], quantised separately."""
    return (nf4_nbytes(2 * intermediate_size * hidden_size, blocksize)
            + nf4_nbytes(hidden_size * intermediate_size, blocksize))


# ---- stores ------------------------------------------------------------------------------------
def _bnb():
    import bitsandbytes.functional as F

    return F


def denest_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                  nested_code: torch.Tensor) -> torch.Tensor:
    """fp32 block scales `[n, blocks]` from double-quantised ones (uint8 `[n, blocks]`, fp32 `[n, nested]`,
    offset `[n]`), computed as bitsandbytes does (code lookup times the nested scale, then the offset)."""
    blocks = absmax.shape[-1]
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE, dim=-1)[..., :blocks]
    return nested_code[absmax.long()] * scale + offset.unsqueeze(-1)


@dataclass(frozen=True)
class _Layout:
    """Shapes of one quantised matrix."""

    shape: tuple[int, int]
    blocksize: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def packed(self) -> int:
        return math.ceil(self.numel / 2)

    @property
    def blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def nested(self) -> int:
        return math.ceil(self.blocks / NESTED_BLOCKSIZE)


class _FillTracking:
    """Which (expert, part) of a store have been filled in: `filled` [E, 2] bool, set by `set_part`."""

    filled: torch.Tensor

    @property
    def complete(self) -> bool:
        """Every expert's two matrices are in."""
        return bool(self.filled.all())

    def missing(self) -> list[tuple[int, str]]:
        """(expert, part) not filled in yet."""
        return [(int(e), PARTS[int(p)]) for e, p in torch.nonzero(~self.filled).tolist()]


class NF4ExpertStore(_FillTracking):
    """The frozen experts of one MoE layer in NF4, each expert's gate_up and down quantised separately.

    Stacked tensors (E leading): `{part}.weight` uint8 [E, packed, 1], `{part}.absmax` uint8 [E, blocks],
    `{part}.nested_absmax` fp32 [E, nested], `{part}.offset` fp32 [E], plus `quant_map` (16) and
    `nested_quant_map` (256) shared by all experts.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype = torch.bfloat16, blocksize: int = BLOCKSIZE, *, allocate: bool = True):
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.dtype, self.blocksize = dtype, blocksize  # dtype: of the weights that were quantised
        self.layouts = {"gate_up": _Layout((2 * intermediate_size, hidden_size), blocksize),
                        "down": _Layout((hidden_size, intermediate_size), blocksize)}
        self.tensors: dict[str, torch.Tensor] = {}
        for part, lay in (self.layouts.items() if allocate else ()):
            self.tensors[f"{part}.weight"] = torch.zeros(num_experts, lay.packed, 1, dtype=torch.uint8)
            self.tensors[f"{part}.absmax"] = torch.zeros(num_experts, lay.blocks, dtype=torch.uint8)
            self.tensors[f"{part}.nested_absmax"] = torch.zeros(num_experts, lay.nested, dtype=torch.float32)
            self.tensors[f"{part}.offset"] = torch.zeros(num_experts, dtype=torch.float32)
        if allocate:
            self.tensors["quant_map"] = torch.zeros(16, dtype=torch.float32)
            self.tensors["nested_quant_map"] = torch.zeros(256, dtype=torch.float32)
        #: which (expert, part) have been quantised in
        self.filled = torch.zeros(num_experts, len(PARTS), dtype=torch.bool)
        self._codes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def from_fused(cls, gate_up: torch.Tensor, down: torch.Tensor, blocksize: int = BLOCKSIZE) -> "NF4ExpertStore":
        """Quantise fused `gate_up [E, 2I, H]` and `down [E, H, I]` expert by expert."""
        num, two_i, hidden = gate_up.shape
        store = cls(num, hidden, two_i // 2, gate_up.dtype, blocksize)
        for e in range(num):
            store.set_expert(e, gate_up[e], down[e])
        return store

    @classmethod
    def from_experts(cls, experts: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     blocksize: int = BLOCKSIZE) -> "NF4ExpertStore":
        """Quantise a list of per-expert (gate_up [2I, H], down [H, I]) pairs."""
        experts = list(experts)
        if not experts:
            raise ValueError("NF4ExpertStore.from_experts: no experts given.")
        two_i, hidden = experts[0][0].shape
        store = cls(len(experts), hidden, two_i // 2, experts[0][0].dtype, blocksize)
        for e, (gate_up, down) in enumerate(experts):
            store.set_expert(e, gate_up, down)
        return store

    def set_expert(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantise one expert's gate_up [2I, H] and down [H, I] into the store."""
        self.set_part(expert, "gate_up", gate_up)
        self.set_part(expert, "down", down)

    def set_part(self, expert: int, part: str, weight: torch.Tensor) -> None:
        """Quantise one matrix (`gate_up` or `down`) of one expert into the store."""
        lay = self.layouts[part]
        if tuple(weight.shape) != lay.shape:
            raise ValueError(f"expert {expert} {part}: shape {tuple(weight.shape)}, the store expects {lay.shape}.")
        packed, state = _bnb().quantize_4bit(weight.detach().contiguous(), blocksize=self.blocksize,
                                             compress_statistics=True, quant_type=QUANT_TYPE)
        t = self.tensors
        t[f"{part}.weight"][expert].copy_(packed.view(lay.packed, 1))
        t[f"{part}.absmax"][expert].copy_(state.absmax)
        t[f"{part}.nested_absmax"][expert].copy_(state.state2.absmax)
        t[f"{part}.offset"][expert] = state.offset
        if not self.filled.any():
            t["quant_map"].copy_(state.code)
            t["nested_quant_map"].copy_(state.state2.code)
        self.filled[expert, PARTS.index(part)] = True

    # ---- reading -------------------------------------------------------------------------------
    def expert_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """The stored NF4 tensors of one expert (views), e.g. for an offload cache to copy."""
        return {name: t[expert] for name, t in self.tensors.items() if name.startswith(PARTS)}

    def weights_from_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device | str,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] dequantised from one expert's tensors (moved to `device` if needed)."""
        from bitsandbytes.functional import QuantState

        device = torch.device(device)
        code, nested_code = self._code_tables(device)
        out = []
        for part in PARTS:
            lay = self.layouts[part]
            get = lambda name: tensors[f"{part}.{name}"].to(device, non_blocking=True)  # noqa: E731
            nested = QuantState(absmax=get("nested_absmax"), code=nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
            state = QuantState(absmax=get("absmax"), shape=torch.Size(lay.shape), code=code,
                               blocksize=self.blocksize, quant_type=QUANT_TYPE, dtype=dtype,
                               offset=get("offset"), state2=nested)
            out.append(_bnb().dequantize_4bit(get("weight"), state))
        return out[0], out[1]

    def weights(self, expert: int, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of one expert, dequantised on `device` in `dtype`."""
        return self.weights_from_tensors(self.expert_tensors(expert), device, dtype)

    def weights_batched(self, experts: Sequence[int], device: torch.device | str,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [n, 2I, H] and down [n, H, I] of `experts`, dequantised on `device` in one bitsandbytes call
        per matrix kind (the same values as `weights` expert by expert)."""
        idx = list(experts)
        sel = None if idx == list(range(self.num_experts)) else torch.tensor(idx, dtype=torch.long)
        return self.weights_from_stacked({name: t if sel is None else t.index_select(0, sel.to(t.device))
                                          for name, t in self.tensors.items() if name.startswith(PARTS)}, device, dtype)

    def weights_from_stacked(self, tensors: dict[str, torch.Tensor], device: torch.device | str,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [n, 2I, H] and down [n, H, I] from n experts' `expert_tensors` stacked on a leading axis (e.g.
        gathered from an offload cache), dequantised in one bitsandbytes call per matrix kind."""
        from bitsandbytes.functional import QuantState

        device = torch.device(device)
        code, nested_code = self._code_tables(device)
        n = tensors["down.offset"].shape[0]
        out = []
        for part in PARTS:
            lay = self.layouts[part]
            if lay.shape[1] % self.blocksize:
                # rows not whole blocks: bitsandbytes' CPU kernel then indexes the scales per call, not per
                # expert (and not as its CUDA kernel does), so keep its per-expert values, expert by expert
                out.append(torch.stack([self.weights_from_tensors({k: v[i] for k, v in tensors.items()}, device,
                                                                  dtype)[PARTS.index(part)] for i in range(n)]))
                continue

            def take(name: str) -> torch.Tensor:
                return tensors[f"{part}.{name}"].to(device, non_blocking=True)

            absmax = denest_absmax(take("absmax"), take("nested_absmax"), take("offset"), nested_code)
            state = QuantState(absmax=absmax.reshape(-1), shape=torch.Size((n * lay.shape[0], lay.shape[1])),
                               code=code, blocksize=self.blocksize, quant_type=QUANT_TYPE, dtype=dtype)
            w = _bnb().dequantize_4bit(take("weight").reshape(-1, 1), state)
            out.append(w.view(n, *lay.shape))
        return out[0], out[1]

    def packed_available(self, part: str, device: torch.device) -> bool:
        """Whether `packed_operands` serves `part` on `device` (the codes stored there, K whole blocks); cheap."""
        return self.tensors[f"{part}.weight"].device == torch.device(device) \
            and not self.layouts[part].shape[1] % self.blocksize

    def packed_operands(self, part: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All experts' packed codes `[E, N, K/2]` uint8 (a view) and de-nested fp32 absmax `[E, N, K/64]` of one
        matrix kind, the layout of grouped NF4 GEMM kernels (`grouped-nf4-gemm`); None when the stored tensors
        are not on `device` or K is not a multiple of the blocksize."""
        if not self.packed_available(part, device):
            return None
        lay, weight = self.layouts[part], self.tensors[f"{part}.weight"]
        _, nested_code = self._code_tables(weight.device)
        absmax = denest_absmax(self.tensors[f"{part}.absmax"], self.tensors[f"{part}.nested_absmax"],
                               self.tensors[f"{part}.offset"], nested_code)
        rows, cols = lay.shape
        return (weight.view(self.num_experts, rows, cols // 2),
                absmax.view(self.num_experts, rows, cols // self.blocksize))

    def _code_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            self._codes[device] = (self.tensors["quant_map"].to(device), self.tensors["nested_quant_map"].to(device))
        return self._codes[device]

    def nbytes(self) -> int:
        """Bytes of the stored tensors (all experts and the two code tables)."""
        return sum(t.nbytes for t in self.tensors.values())

    def to(self, device: torch.device | str) -> "NF4ExpertStore":
        """Move the stored tensors to `device` (in place; e.g. resident NF4 experts on the GPU); returns self."""
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def pin_memory(self) -> "NF4ExpertStore":
        """Put the stored tensors in pinned host memory (fast, asynchronous copies to a GPU); returns self."""
        if torch.cuda.is_available():
            self.tensors = {k: v.pin_memory() for k, v in self.tensors.items()}
        return self

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every stored tensor."""
        u8, f32, E = torch.uint8, torch.float32, self.num_experts
        out = {"quant_map": ((16,), f32), "nested_quant_map": ((256,), f32)}
        for part, lay in self.layouts.items():
            out.update({f"{part}.weight": ((E, lay.packed, 1), u8), f"{part}.absmax": ((E, lay.blocks), u8),
                        f"{part}.nested_absmax": ((E, lay.nested), f32), f"{part}.offset": ((E,), f32)})
        return out

    # ---- files ---------------------------------------------------------------------------------
    def meta(self) -> dict:
        """The JSON description saved beside the tensors."""
        return {"format": "moetune-nf4-experts", "version": FORMAT_VERSION, "quant": QUANT_TYPE,
                "num_experts": self.num_experts, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "dtype": str(self.dtype).removeprefix("torch."),
                "blocksize": self.blocksize, "nested_blocksize": NESTED_BLOCKSIZE, "double_quant": True,
                "shapes": {p: list(lay.shape) for p, lay in self.layouts.items()},
                "tensors": {k: list(shape) for k, (shape, _) in self.expected_shapes().items()}}

    def save(self, folder: str | Path) -> Path:
        """Write the store to `folder` (experts.safetensors, then experts.json), atomically."""
        if not self.complete:
            raise ValueError(f"NF4ExpertStore.save: experts {self.missing()[:5]} are not quantised yet.")
        return _save_store(folder, {k: v.cpu().contiguous() for k, v in self.tensors.items()}, self.meta())

    @classmethod
    def load(cls, folder: str | Path) -> "NF4ExpertStore":
        """Read a store written by `save`; raises QuantCacheError when it is missing or damaged."""
        meta, tensors = _load_store(folder, "moetune-nf4-experts")
        store = cls(meta["num_experts"], meta["hidden_size"], meta["intermediate_size"],
                    getattr(torch, meta["dtype"]), meta["blocksize"], allocate=False)
        _check_tensors(folder, store.expected_shapes(), tensors)
        store.tensors = tensors
        store.filled[:] = True
        return store


class DenseExpertStore(_FillTracking):
    """The frozen experts of one MoE layer unquantised (bf16 or fp32): views into fused
    `gate_up [E, 2I, H]` and `down [E, H, I]`, no copy."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[0] != down.shape[0] \
                or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
            raise ValueError(f"DenseExpertStore: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} "
                             "are not [E, 2I, H] and [E, H, I].")
        self.gate_up, self.down = gate_up.detach(), down.detach()
        self.num_experts = gate_up.shape[0]
        self.hidden_size, self.intermediate_size = down.shape[1], down.shape[2]
        self.dtype = gate_up.dtype
        self.filled = torch.ones(self.num_experts, len(PARTS), dtype=torch.bool)

    @classmethod
    def empty(cls, num_experts: int, hidden_size: int, intermediate_size: int,
              dtype: torch.dtype = torch.bfloat16) -> "DenseExpertStore":
        """A store to fill expert by expert (`set_expert` / `set_part`)."""
        store = cls(torch.zeros(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                    torch.zeros(num_experts, hidden_size, intermediate_size, dtype=dtype))
        store.filled[:] = False
        return store

    @classmethod
    def from_module(cls, experts: nn.Module) -> "DenseExpertStore":
        """Wrap a family's experts module (`gate_up_proj`, `down_proj`), no copy."""
        return cls(experts.gate_up_proj, experts.down_proj)

    def set_expert(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy one expert's gate_up [2I, H] and down [H, I] in."""
        self.set_part(expert, "gate_up", gate_up)
        self.set_part(expert, "down", down)

    def set_part(self, expert: int, part: str, weight: torch.Tensor) -> None:
        """Copy one matrix (`gate_up` or `down`) of one expert in."""
        target = (self.gate_up if part == "gate_up" else self.down)[expert]
        if target.shape != weight.shape:
            raise ValueError(f"expert {expert} {part}: shape {tuple(weight.shape)}, the store expects "
                             f"{tuple(target.shape)}.")
        target.copy_(weight)
        self.filled[expert, PARTS.index(part)] = True

    def to(self, device: torch.device | str) -> "DenseExpertStore":
        """The store with its tensors on `device` (self when they are there already)."""
        if self.gate_up.device == torch.device(device):
            return self
        return DenseExpertStore(self.gate_up.to(device), self.down.to(device))

    def weights(self, expert: int, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of one expert on `device` in `dtype` (the stored views when they match)."""
        return (self.gate_up[expert].to(device=device, dtype=dtype), self.down[expert].to(device=device, dtype=dtype))

    def weights_batched(self, experts: Sequence[int], device: torch.device | str,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [n, 2I, H] and down [n, H, I] of `experts` on `device` in `dtype` (views for a run of experts)."""
        idx = list(experts)
        if idx == list(range(idx[0], idx[0] + len(idx))):
            gate_up, down = self.gate_up[idx[0]:idx[-1] + 1], self.down[idx[0]:idx[-1] + 1]
        else:
            sel = torch.tensor(idx, dtype=torch.long, device=self.gate_up.device)
            gate_up, down = self.gate_up.index_select(0, sel), self.down.index_select(0, sel)
        return gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes of the fused tensors."""
        return self.gate_up.nbytes + self.down.nbytes

    def meta(self) -> dict:
        """The JSON description saved beside the tensors."""
        return {"format": "moetune-dense-experts", "version": FORMAT_VERSION, "quant": "none",
                "num_experts": self.num_experts, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "dtype": str(self.dtype).removeprefix("torch."),
                "tensors": {"gate_up": list(self.gate_up.shape), "down": list(self.down.shape)}}

    def save(self, folder: str | Path) -> Path:
        """Write the store to `folder` (experts.safetensors, then experts.json), atomically."""
        return _save_store(folder, {"gate_up": self.gate_up.cpu().contiguous(), "down": self.down.cpu().contiguous()},
                           self.meta())

    @classmethod
    def load(cls, folder: str | Path) -> "DenseExpertStore":
        """Read a store written by `save`; raises QuantCacheError when it is missing or damaged."""
        meta, tensors = _load_store(folder, "moetune-dense-experts")
        if set(tensors) != {"gate_up", "down"}:
            raise QuantCacheError(f"{folder}: expected tensors gate_up and down, found {sorted(tensors)}.")
        return cls(tensors["gate_up"], tensors["down"])


ExpertStoreT = Union[NF4ExpertStore, DenseExpertStore]


# The tensor file's SHA-256 is written into experts.json and checked on every load. On load it is taken from the
# bytes as `read_tensors(..., digest=)` reads them, not by a second pass with engine.io.sha256_file: the load reads
# every byte anyway. Measured on a 198 MiB OLMoE-sized layer file in the page cache (2 busy shared cores): read
# alone 0.16 s, hashed while reading 0.30 s, sha256_file then read 0.44 s; SHA-256 itself ran at 1.1-1.3 GB/s
# (SHA-NI), CRC32 at 2.2 GB/s. The hashing runs on a side thread (hashlib releases the GIL), so where a core is
# free it overlaps the reads; on that busy machine it could not. Writing hashes the new file once with
# sha256_file, next to a quantisation that costs far more.
def _save_store(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / STORE_FILE) as tmp:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
    meta = {**meta, "file_bytes": (folder / STORE_FILE).stat().st_size, "sha256": digest}
    atomic_write_json(folder / STORE_META, meta)
    return folder


def _load_store(folder: str | Path, fmt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    meta_file, data_file = folder / STORE_META, folder / STORE_FILE
    if not meta_file.is_file() or not data_file.is_file():
        raise QuantCacheError(f"{folder} holds no saved expert store ({STORE_FILE} + {STORE_META}).")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantCacheError(f"{meta_file} is damaged: not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("version") != FORMAT_VERSION:
        got = (f"format {meta.get('format')!r}, version {meta.get('version')!r}" if isinstance(meta, dict)
               else f"a {type(meta).__name__}")
        raise QuantCacheError(f"{meta_file} is not a {fmt!r} v{FORMAT_VERSION} description ({got}).")
    if not isinstance(meta.get("sha256"), str):
        raise QuantCacheError(f"{meta_file} has no checksum of {STORE_FILE} (an older MoETune wrote it), so "
                              "its experts cannot be checked.")
    if data_file.stat().st_size != meta.get("file_bytes"):
        raise QuantCacheError(f"{data_file} is damaged: it is {data_file.stat().st_size} bytes, {STORE_META} "
                              f"says {meta.get('file_bytes')} (truncated or half-written).")
    digest = hashlib.sha256()
    try:
        tensors = dict(read_tensors(data_file, digest=digest))
    except CheckpointError as e:
        raise QuantCacheError(f"{data_file} is damaged: {e}") from None
    if digest.hexdigest() != meta["sha256"]:
        raise QuantCacheError(f"{data_file} is damaged: its SHA-256 is {digest.hexdigest()[:12]}…, {STORE_META} "
                              f"says {meta['sha256'][:12]}… (bytes changed since it was written).")
    return meta, tensors


def _check_tensors(folder, want: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   got: dict[str, torch.Tensor]) -> None:
    for name, (shape, dtype) in want.items():
        g = got.get(name)
        if g is None or tuple(g.shape) != tuple(shape) or g.dtype != dtype:
            found = None if g is None else (tuple(g.shape), g.dtype)
            raise QuantCacheError(f"{folder}: tensor {name!r} should be {tuple(shape)} {dtype}, found {found}; "
                                  "delete the folder to rebuild it.")
    extra = sorted(set(got) - set(want))
    if extra:
        raise QuantCacheError(f"{folder}: unexpected tensors {extra[:5]}; delete the folder to rebuild it.")


# ---- reading safetensors without mmap ------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_tensors(path: str | Path, select: Callable[[str], bool] | None = None,
                 digest=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of a checkpoint folder (every shard) or one .safetensors file, one tensor at a
    time, read with plain file reads in file order; `select(name)` False skips a tensor unread.

    Unlike a memory map (engine.loader.iter_tensors), a tensor read here is the only copy in memory, so
    resident memory stays near one tensor rather than growing to the size of the file. With `digest` (a
    hashlib object; one file, no `select`) every byte of the file is fed to it as it is read, on a side thread,
    so once the generator is exhausted `digest` holds the file's hash (what engine.io.sha256_file gives).
    """
    path = Path(path)
    files = [path] if path.is_file() else checkpoint_files(path)
    if digest is not None and (len(files) != 1 or select is not None):
        raise ValueError("read_tensors: digest= hashes one whole file: give one .safetensors file and no select.")
    hasher = _Hasher(digest) if digest is not None else None
    try:
        for file in files:
            yield from _read_file_tensors(file, select, hasher)
        if hasher is not None:
            hasher.finish()
    finally:
        if hasher is not None:
            hasher.close()


class _Hasher:
    """Feeds buffers to a hashlib object in order on one side thread (hashlib releases the GIL on large
    buffers), so hashing overlaps the next read."""

    def __init__(self, digest):
        from concurrent.futures import ThreadPoolExecutor

        self.digest, self.pool, self.pending = digest, ThreadPoolExecutor(1, thread_name_prefix="moetune-hash"), []

    def update(self, data) -> None:
        self.pending = [f for f in self.pending if not f.done()] + [self.pool.submit(self.digest.update, data)]

    def finish(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _read_file_tensors(file: Path, select: Callable[[str], bool] | None,
                       hasher: _Hasher | None) -> Iterator[tuple[str, torch.Tensor]]:
    with open(file, "rb", buffering=0) as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (shorter than its header).")
        (size,) = struct.unpack("<Q", head)
        raw = f.read(size)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a damaged safetensors header ({e}).") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file} has a damaged safetensors header (not a mapping).")
        if hasher is not None:
            hasher.update(head + raw)
        header.pop("__metadata__", None)
        start = pos = 8 + size  # pos: the next byte to hash
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if select is not None and not select(name):
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}, "
                                      "which MoETune cannot read.")
            begin, end = info["data_offsets"]
            if hasher is not None and start + begin > pos:  # bytes between tensors count too
                f.seek(pos)
                hasher.update(f.read(start + begin - pos))
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            view, done = memoryview(buf.numpy()), 0
            while done < end - begin:  # one read(2) returns at most ~2 GB
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{file} is truncated: tensor {name!r} ends past the end of the file.")
                done += got
            if hasher is not None:
                hasher.update(view)
                pos = max(pos, start + end)
            yield name, buf.view(dtype).reshape(info["shape"])
        if hasher is not None:
            f.seek(pos)
            hasher.update(f.read())  # whatever follows the last tensor


# ---- streaming quantisation ----------------------------------------------------------------------
def cache_key(path: str | Path, quant: str = "nf4", blocksize: int = BLOCKSIZE) -> dict:
    """What a quantised-expert cache folder must match: the checkpoint's identity (engine.loader.base_identity),
    its weight files (name, size, modification time) and the quantisation settings."""
    files = [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
             for f in checkpoint_files(path)]
    return {"format_version": FORMAT_VERSION, "identity": base_identity(path), "files": files,
            "quant": quant, "blocksize": blocksize}


def cache_folder(path: str | Path, cache_dir: str | Path, quant: str = "nf4", blocksize: int = BLOCKSIZE) -> Path:
    """The folder under `cache_dir` that holds (or will hold) the quantised experts of a checkpoint."""
    key = cache_key(path, quant, blocksize)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['identity']['model_type']}-{quant}-{digest}"


@dataclass
class CachedExperts:
    """What a matching cache folder gave back: the layers read intact (checksums verified), and the layers to
    quantise again, each with the reason (damaged, no checksum, missing)."""

    stores: dict[int, "ExpertStoreT"]
    redo: dict[int, str]


def load_cached_experts(path: str | Path, cache_dir: str | Path, quant: str = "nf4",
                        blocksize: int = BLOCKSIZE) -> CachedExperts | None:
    """The cached stores of a checkpoint's MoE layers, each checked against the checksum written with it, and
    the layers to quantise again; None when no cache folder matches the checkpoint (none yet, or stale)."""
    folder = cache_folder(path, cache_dir, quant, blocksize)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    config, family = read_config(path)
    layers = list(family.facts(config).moe_layers)
    try:
        info = json.loads(manifest.read_text())
        if not isinstance(info, dict) or info.get("key") != json.loads(json.dumps(cache_key(path, quant, blocksize))):
            return None
        listed = {int(layer) for layer in info["layers"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        return CachedExperts({}, {l: f"{manifest} is damaged ({e})" for l in layers})
    cls = NF4ExpertStore if quant == "nf4" else DenseExpertStore
    out = CachedExperts({}, {})
    for layer in layers:
        sub = folder / f"layer-{layer:03d}"
        if layer not in listed:
            out.redo[layer] = f"{sub} is not in {manifest}"
            continue
        try:
            out.stores[layer] = cls.load(sub)
        except QuantCacheError as e:
            out.redo[layer] = str(e).rstrip(".")
    return out


def _fused_expert_regex(family):
    import re

    return re.compile(rf"model\.layers\.(\d+)\.{re.escape(family.block_attr)}\.experts\.(gate_up_proj|down_proj)")


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
        return family.parse_expert_key(name) is not None or fused_re.fullmatch(family.rename(name)) is not None \
            or family.raw_expert_layer(name) is not None

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

    source = family.convert_stream(read_tensors(path, wanted if cached is not None else None) if tensors is None
                                   else tensors)
    for name, t in source:
        if cached is not None and not wanted(name):
            continue  # an expert of a layer the cache holds intact
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


# ---- QLoRA-style NF4 for the other linear layers ---------------------------------------------------
def is_quantizable_linear(name: str, module: nn.Module) -> bool:
    """Whether `quantize_linear_layers` stores this module in NF4: a plain nn.Linear that is not the LM
    head, a router/gate (`...gate`, `...router`) or part of an adapter (`peft`, `lora`)."""
    if type(module) is not nn.Linear:
        return False
    parts = name.split(".")
    last = parts[-1]
    if last == "lm_head" or last.endswith("gate") or "router" in last:
        return False
    return not any(p in ("peft", "lora") or p.startswith("lora") for p in parts)


def quantize_linear_layers(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                           blocksize: int = BLOCKSIZE) -> list[str]:
    """Swap the model's frozen nn.Linear layers (attention q/k/v/o, shared experts, dense MLPs; never lm_head,
    routers or adapters) for bitsandbytes NF4 `Linear4bit` on their current device; returns the names swapped."""
    import bitsandbytes as bnb

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = []
    for name, module in list(model.named_modules()):
        if module is out_emb or not is_quantizable_linear(name, module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = module.weight.device
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type=QUANT_TYPE,
                                device="meta")
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=blocksize,
                                       compress_statistics=True, quant_type=QUANT_TYPE, module=new).to(device)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data, requires_grad=False)
        new.train(module.training)
        setattr(parent, child, new)
        swapped.append(name)
    return swapped


CACHE_ENV = "MOETUNE_CACHE"


def default_cache_dir() -> Path:
    """Where quantised experts are cached between runs: $MOETUNE_CACHE, else ~/.cache/moetune."""
    import os

    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moetune").expanduser() / "experts"


def expert_store(experts: nn.Module, quant: str, fused: tuple[torch.Tensor, torch.Tensor] | None = None) -> ExpertStoreT:
    """The store for a loaded family experts module: NF4 (quantised expert by expert, kept on the
    module's device) or its own bf16/fp32 tensors (`quant='bf16'`, no copy). `fused`: its experts as canonical
    gate_up [E, 2I, H] and down [E, H, I] when the module's layout differs (Family.canonical_experts)."""
    gate_up, down = fused if fused is not None else (experts.gate_up_proj, experts.down_proj)
    if quant == "nf4":
        return NF4ExpertStore.from_fused(gate_up.detach(), down.detach()).to(gate_up.device)
    return DenseExpertStore(gate_up, down)


def quantized_nbytes(stores: dict[int, ExpertStoreT]) -> int:
    """Bytes of a dict of layer stores."""
    return sum(s.nbytes() for s in stores.values())


__all__ = ["BLOCKSIZE", "CODE_TABLE_BYTES", "CachedExperts", "DenseExpertStore", "NF4ExpertStore", "QuantCacheError", "cache_folder",
           "cache_key", "default_cache_dir", "expert_store", "is_quantizable_linear", "load_cached_experts", "nf4_expert_nbytes", "nf4_nbytes",
           "quantize_checkpoint_experts", "quantize_linear_layers", "quantized_nbytes", "read_tensors"]
