"""Grouped matrix products over row groups: rows `a [N, K]` sorted by group, `b [G, K, M]` one matrix per
group, group g owning rows `offs[g-1]:offs[g]`; `out[rows_g] = a[rows_g] @ b[g]`.

`torch._grouped_mm` runs it in one call where the device and dtype allow it (CPU: fp32 / bf16 / fp16 from
torch 2.9 on; CUDA: bf16 on compute capability 9.x and 10.x, the GPUs torch builds its CUTLASS grouped kernel
for). Elsewhere (float64, older torch, consumer GPUs: sm_86 / sm_89 / sm_120) the path is segment matmuls: one
`mm` per group, still one autograd node for all groups. On those GPUs torch's own `_grouped_mm` would take its
fallback, which copies the offsets to the host (a sync per call) and runs the same `mm` per group; our
segments read the counts the host already has, so they never sync. On the CPU `_grouped_mm` runs one `mm` per
group internally, so both paths give the same bits as per-group `F.linear`.

`MOETUNE_GROUPED_MM=segment` forces the segment path everywhere (the device check runs the consumer GPUs' path
on a data-centre GPU with it); `grouped` skips the capability check (for a GPU this list does not know yet).
A failure of `_grouped_mm` other than running out of memory marks the (device, dtype) unsupported for the
process; an OutOfMemoryError is raised as it is, so a transient OOM never disables grouped GEMM for good.
"""

from __future__ import annotations

import itertools
import os
from typing import Sequence

import torch

#: compute capability majors whose `torch._grouped_mm` is torch's CUTLASS kernel (Hopper, Blackwell data centre)
GROUPED_MM_MAJORS = (9, 10)
#: environment override: auto (default), segment (never `_grouped_mm`), grouped (skip the capability check)
ENV_GROUPED_MM = "MOETUNE_GROUPED_MM"

#: (device type, dtype) pairs on which torch._grouped_mm failed once; they use the segment fallback
_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` is expected to run on `device` in `dtype` (else segment matmuls)."""
    mode = os.environ.get(ENV_GROUPED_MM, "auto").strip().lower() or "auto"
    if mode not in ("auto", "segment", "grouped"):
        raise ValueError(f"{ENV_GROUPED_MM}={mode!r}: use auto, segment or grouped.")
    if mode == "segment" or not hasattr(torch, "_grouped_mm") or (device.type, dtype) in _UNSUPPORTED:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16) and _torch_at_least(2, 9)
    if device.type == "cuda":
        if dtype != torch.bfloat16 or not _torch_at_least(2, 9):
            return False
        return mode == "grouped" or torch.cuda.get_device_capability(device)[0] in GROUPED_MM_MAJORS
    return False


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def _segments(counts: Sequence[int]):
    start = 0
    for g, n in enumerate(counts):
        yield g, start, start + n
        start += n


def _mm_3d(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """a [N, K] (grouped rows) @ b [G, K, M] -> [N, M], no autograd."""
    if a.shape[0] and grouped_mm_supported(a.device, a.dtype) and _aligned((a, b), b.shape[-2:]):
        try:
            return torch._grouped_mm(a, b, offs=offs)
        except torch.OutOfMemoryError:
            raise  # memory, not support: the caller may free some and retry; never disable grouped GEMM for it
        except (RuntimeError, NotImplementedError):
            _UNSUPPORTED.add((a.device.type, a.dtype))
    out = a.new_empty(a.shape[0], b.shape[-1])
    for g, s, e in _segments(counts):
        if e > s:
            torch.mm(a[s:e], b[g], out=out[s:e])
    return out


def _mm_2d(a_t: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Per group a_g.T @ grad_g: a_t [K, N] (a transposed), grad [N, M] -> [G, K, M], no autograd."""
    if a_t.shape[1] and grouped_mm_supported(a_t.device, a_t.dtype) \
            and _aligned((a_t, grad), (a_t.shape[0], grad.shape[1])):
        try:
            return torch._grouped_mm(a_t, grad, offs=offs)
        except torch.OutOfMemoryError:
            raise  # memory, not support: the caller may free some and retry; never disable grouped GEMM for it
        except (RuntimeError, NotImplementedError):
            _UNSUPPORTED.add((a_t.device.type, a_t.dtype))
    out = a_t.new_zeros(len(counts), a_t.shape[0], grad.shape[1])
    for g, s, e in _segments(counts):
        if e > s:
            torch.mm(a_t[:, s:e], grad[s:e], out=out[g])
    return out


def _aligned(ts: tuple[torch.Tensor, ...], dims: tuple[int, ...]) -> bool:
    """CUDA's grouped GEMM wants 16-byte aligned matrix strides (`dims`: the non-grouped sizes) and data (the CPU
    kernel takes any strides from torch 2.11)."""
    if ts[0].device.type != "cuda":
        return True
    size = ts[0].element_size()
    return all(d * size % 16 == 0 for d in dims) and all(t.data_ptr() % 16 == 0 for t in ts)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, offs, counts):
        ctx.save_for_backward(a, b, offs)
        ctx.counts = counts
        return _mm_3d(a, b, offs, counts)

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _mm_3d(grad, b.transpose(1, 2), offs, ctx.counts)
        if ctx.needs_input_grad[1]:
            grad_b = _mm_2d(a.t(), grad, offs, ctx.counts)
        return grad_a, grad_b, None, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """`a [N, K]` rows grouped as `counts` (ends `offs`, int32 on a's device) times `b [G, K, M]` -> `[N, M]`,
    differentiable in both; one grouped GEMM where supported, segment matmuls elsewhere."""
    return _GroupedMM.apply(a, b, offs, list(counts))


def grouped_mm_frozen(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Like `grouped_mm`, without autograd (for frozen weights that a caller's Function recomputes)."""
    return _mm_3d(a, b, offs, list(counts))


def host_tensor_to(values: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Python ints the host already has as a tensor on `device`, copied without waiting (`non_blocking`: the host
    stages the few bytes and goes on; a blocking copy would wait for every kernel queued before it)."""
    t = torch.tensor(list(values), dtype=dtype)
    device = torch.device(device)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def group_offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """Group end offsets (cumulative counts) as int32 on `device`, the form `torch._grouped_mm` takes; computed
    from the host's counts and copied without a sync."""
    return host_tensor_to(list(itertools.accumulate(counts)), device, torch.int32)


def sort_by_group(top_index: torch.Tensor, num_groups: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(token, slot) pairs of a top-k choice `[T, k]` grouped by the chosen index with one stable sort and one
    device sync: pairs per group (a list), then the token and the slot of each pair in that order (slot-major
    within a group: transformers' eager add order)."""
    num_tokens = top_index.shape[0]
    with torch.no_grad():
        flat = top_index.T.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_groups).tolist()
    return counts, order % num_tokens, order // num_tokens


def group_rows(per_group: torch.Tensor, groups: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
    """Each row's entry of `per_group` [G_all, ...] for rows sorted by group (`counts[i]` rows of `groups[i]`),
    e.g. every row's expert bias."""
    # the host's lists copied without waiting, and the output size given: no host sync (repeat_interleave
    # would otherwise read the repeats back to size its output)
    idx = torch.repeat_interleave(host_tensor_to(groups, per_group.device), host_tensor_to(counts, per_group.device),
                                  output_size=sum(counts))
    return per_group.index_select(0, idx)
