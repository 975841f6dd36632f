"""Frozen expert weights in NF4 (bitsandbytes, double quantisation, blocksize 64) or bf16, one store
per MoE layer, and the streaming quantiser that builds the stores from a checkpoint tensor by tensor.

- `NF4ExpertStore`: each expert's `gate_up [2I, H]` (rows: gate then up, transformers 5 layout) and
  `down [H, I]` quantised separately with `bitsandbytes.functional.quantize_4bit`; the quantised
  tensors of all experts are stacked (`[E, ...]`), so one expert is a set of views. `weights(e,
  device, dtype)` dequantises on `device` with bitsandbytes' own `dequantize_4bit` (exactly what
  bitsandbytes returns for the same quant state). It is also a host store for `engine.model.offload`
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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from .grouped import host_tensor_to
from .store_files import FORMAT_VERSION, QuantCacheError, _check_tensors, _load_store, _save_store

#: bitsandbytes settings of every NF4 tensor MoETune writes
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for the double-quantised absmax
QUANT_TYPE = "nf4"
PARTS = ("gate_up", "down")


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
        self.arena = None  # the host arena the tensors live in once packed for offloading (pin_memory)
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
        sel = None if idx == list(range(self.num_experts)) else host_tensor_to(idx, self.tensors["down.offset"].device)
        return self.weights_from_stacked({name: t if sel is None else t.index_select(0, sel)
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
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        if any(moved[k] is not v for k, v in self.tensors.items()):
            self.arena = None  # the tensors left the host arena
        self.tensors = moved
        return self

    def pin_memory(self, pin: bool | None = None) -> "NF4ExpertStore":
        """Put the stored tensors in one host arena, expert after expert (`engine.model.host_arena`: one copy an
        expert for the offload cache), page-locked when CUDA is there (`pin`: force); returns self."""
        from .host_arena import HostArena

        pin = torch.cuda.is_available() if pin is None else pin
        if getattr(self, "arena", None) is None:
            per = {k: v for k, v in self.tensors.items() if k.startswith(PARTS)}
            self.arena = HostArena(per, {k: v for k, v in self.tensors.items() if k not in per})
            self.tensors = self.arena.tensors
        if pin:
            self.arena.pin()
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
            sel = host_tensor_to(idx, self.gate_up.device)  # copied without waiting for the stream
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
