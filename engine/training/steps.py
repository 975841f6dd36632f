"""The layer-major training step (DESIGN "Memory"): all micro-batches of an optimizer step go through
a decoder layer before the next layer starts, so each layer's experts are needed once in the forward
sweep (layers 0..L-1) and once in the backward sweep (L-1..0) — an offloaded layer crosses PCIe twice
per step, not twice per micro-batch.

Forward: every micro-batch is embedded, then each layer runs on every micro-batch without a graph,
keeping only the layer's input (per-layer activation checkpointing). The head and the loss run per
micro-batch with a graph (the model's own forward past its layers, so a family's logit scaling applies);
their backward gives the gradient at the last hidden state.
Backward: from the last layer to the first, each layer is recomputed for each micro-batch from its
saved input under autograd (same RNG state as its forward, so dropout masks match) and the incoming
gradient is pushed through it, together with the balance losses its routers recorded; adapter
gradients accumulate in `.grad` as `(loss / accum).backward()` per micro-batch would leave them.

The decoder layers are called with exactly the arguments the model's own forward gives them
(causal / sliding masks, rotary position embeddings, position ids): they are recorded by running the
model's inner forward once with stand-in layers, so every transformers family is called correctly.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from ..model.arch import get_family


class LayerHooks(Protocol):
    """Told where the step is, e.g. to prefetch offloaded experts (`engine.model.offload.OffloadSchedule`)."""

    def begin(self, phase: str, layer: int) -> None:
        """Before `layer` runs for every micro-batch; phase is "forward" or "backward"."""
        ...

    def end(self, phase: str, layer: int) -> None:
        """After `layer` ran for every micro-batch."""
        ...


class StepResult(NamedTuple):
    """What one layer-major step reports, summed as the trainer's micro-batch loop sums them."""

    loss: float  # Σ_m loss_m / accum
    aux: float  # Σ_m balance_loss_m / accum (0.0 when there are none)
    usage: list[list[int]] | None  # per MoE layer (sorted), tokens per expert over all micro-batches


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments it is called with, returns its input."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class _MicroBatch:
    inputs: dict[str, Any]
    labels: torch.Tensor
    args: list[tuple] = field(default_factory=list)  # per layer: positional args after hidden_states
    kwargs: list[dict] = field(default_factory=list)  # per layer: keyword args
    hidden: torch.Tensor | None = None
    grad: torch.Tensor | None = None


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _record_layer_calls(model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[tuple], list[dict]]:
    """Embedding output and the (args, kwargs) the model's forward passes to each decoder layer."""
    inner = model.model
    original = inner.layers
    recorders = nn.ModuleList([_Recorder(layer) for layer in original])
    inner.layers = recorders
    try:
        inner(**inputs, use_cache=False)
    finally:
        inner.layers = original
    if any(len(r.calls) != 1 for r in recorders):
        raise RuntimeError("layer_major_step: the model's forward did not call each decoder layer exactly once.")
    embeds = recorders[0].calls[0][0]
    return embeds, [r.calls[0][1] for r in recorders], [r.calls[0][2] for r in recorders]


class _LastHidden(nn.Module):
    """Stands in for the inner model in the *ForCausalLM's own forward: returns a given last hidden state through
    the final norm, so that the model's own head makes the logits and the loss (Granite divides the logits by
    logits_scaling, for one), as the recorded calls let the model's own forward drive the decoder layers."""

    def __init__(self, norm: nn.Module, hidden: torch.Tensor):
        super().__init__()
        self.norm, self.hidden = norm, hidden

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import MoeModelOutputWithPast

        class Output(MoeModelOutputWithPast):
            """The last hidden state; None for any other field a family's head passes on (Gemma 4's
            shared_kv_states)."""

            def __getattr__(self, name: str):
                if name.startswith("__"):
                    raise AttributeError(name)
                return None

        return Output(last_hidden_state=self.norm(self.hidden))


def _head_loss(model: nn.Module, final_norm: nn.Module, hidden: torch.Tensor, mb: "_MicroBatch",
               num_items: int | None) -> torch.Tensor:
    """One micro-batch's loss from its last hidden state, computed by the model's own forward past its layers."""
    inner = model.model
    model.model = _LastHidden(final_norm, hidden)
    try:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        return model(**mb.inputs, labels=mb.labels, use_cache=False, **extra).loss
    finally:
        model.model = inner


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _restored_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device):
    before = _rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(before[0])
        if before[1] is not None:
            torch.cuda.set_rng_state(before[1], device)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_major_step(model: nn.Module, peft, micro_batches: Sequence[dict[str, torch.Tensor]],
                     accum: int | None = None, *, hooks: LayerHooks | None = None,
                     autocast_dtype: torch.dtype | None = None,
                     num_items: Sequence[int] | None = None) -> StepResult:
    """Forward and backward of one optimizer step in layer-major order; gradients land in `.grad`.

    `model` is a *ForCausalLM (decoder layers at `model.model.layers`, the family's final norm `model.model.norm`,
    `model.lm_head`); `peft` the RoutedPEFT attached to it (for balance losses and usage) or None;
    each micro-batch a dict with `input_ids`, `labels` and usually `attention_mask`. Gradients equal
    those of `((loss_m + aux_m) / accum).backward()` for every micro-batch m; `accum` defaults to the
    number of micro-batches. `autocast_dtype` (e.g. torch.bfloat16) runs forward and recompute under
    autocast. `num_items[m]` (data parallel: the response tokens of micro-batch m on all ranks) makes loss_m
    this rank's token sum divided by it instead of its own mean. The caller zeroes gradients and steps.
    """
    if not micro_batches:
        raise ValueError("layer_major_step: no micro-batches.")
    if getattr(model.config, "output_router_logits", False):
        raise ValueError("layer_major_step: model.config.output_router_logits is True; transformers' own "
                         "router loss is not computed layer by layer. Set it to False and use "
                         "routing.base_balance_loss instead.")
    accum = accum or len(micro_batches)
    layers = _layers(model)
    final_norm = getattr(model.model, get_family(model.config.model_type).final_norm_attr)
    device = next(model.parameters()).device
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype is not None \
        else contextlib.nullcontext
    taps = dict(peft.taps) if peft is not None else {}
    usage: dict[int, torch.Tensor] = {}
    embed_trainable = any(p.requires_grad for p in model.model.embed_tokens.parameters())
    checkpointing = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    for layer in layers:  # this step is its own checkpointing
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
    if peft is not None:
        peft.clear_losses()
    # losses summed on the device and read once at the end: an .item() per micro-batch and layer would stop the
    # host until the GPU caught up, every time (the planner's host-sync budget, tests/test_gpu_readiness_hot.py)
    loss_sum = aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        # ---- forward sweep: embed, then layer by layer over all micro-batches, no graph ----------
        mbs: list[_MicroBatch] = []
        with torch.no_grad(), autocast():
            for batch in micro_batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                if "labels" not in batch:
                    raise ValueError("layer_major_step: every micro-batch needs 'labels'.")
                embeds, args, kwargs = _record_layer_calls(model, inputs)
                mbs.append(_MicroBatch(inputs, batch["labels"], args, kwargs, hidden=embeds))
        saved: list[list[torch.Tensor]] = []  # saved[l][m]: input of layer l for micro-batch m
        rng: list[list[tuple]] = []
        counted: list[list] = [[] for _ in mbs]  # per micro-batch, per balance term: counts of every layer
        for i, layer in enumerate(layers):
            if hooks is not None:
                hooks.begin("forward", i)
            saved.append([])
            rng.append([])
            for m, mb in enumerate(mbs):
                saved[i].append(mb.hidden)
                rng[i].append(_rng_state(device))
                if peft is not None:
                    peft.balance_begin(mb.inputs.get("attention_mask"))
                with torch.no_grad(), autocast():
                    mb.hidden = _output(layer(mb.hidden, *mb.args[i], **mb.kwargs[i]))
                if peft is not None:
                    counted[m] = [c if a is None else a if c is None else a + c
                                  for a, c in itertools.zip_longest(counted[m], peft.balance_counted())]
                tap = taps.get(i)
                if tap is not None and tap.last_counts is not None:
                    usage[i] = usage[i] + tap.last_counts if i in usage else tap.last_counts.clone()
            if hooks is not None:
                hooks.end("forward", i)
        totals = _global_balance_totals(counted)  # the loss of layer l needs the counts of all layers (and ranks)
        if peft is not None:
            peft.clear_losses()
        # ---- head and loss per micro-batch: gradient at the last hidden state --------------------
        for m, mb in enumerate(mbs):
            h = mb.hidden.detach().requires_grad_(True)
            with autocast():
                loss = _head_loss(model, final_norm, h, mb, num_items[m] if num_items else None)
            (loss / accum).backward()
            loss_sum = loss_sum + loss.detach().double() / accum
            mb.grad, mb.hidden = h.grad, None
            del loss, h  # h: the last micro-batch's hidden state, no longer needed
        # ---- backward sweep: recompute each layer under autograd, push the gradient through -------
        for i in reversed(range(len(layers))):
            layer = layers[i]
            if hooks is not None:
                hooks.begin("backward", i)
            needs_input_grad = i > 0 or embed_trainable
            for m, mb in enumerate(mbs):
                x = saved[i][m].detach().requires_grad_(needs_input_grad)
                if peft is not None:
                    peft.balance_begin(mb.inputs.get("attention_mask"), totals[m])
                with _restored_rng(rng[i][m], device), torch.enable_grad(), autocast():
                    out = _output(layer(x, *mb.args[i], **mb.kwargs[i]))
                aux = peft.aux_loss() if peft is not None else None
                outputs, grads = [], []
                if out.requires_grad:
                    outputs.append(out)
                    grads.append(mb.grad.to(out.dtype))
                if aux is not None:
                    aux_sum = aux_sum + aux.detach().double() / accum
                    if aux.requires_grad:
                        outputs.append(aux / accum)
                        grads.append(torch.ones_like(aux))
                if outputs:
                    torch.autograd.backward(outputs, grads)
                mb.grad = x.grad if needs_input_grad else None
                saved[i][m] = None
                rng[i][m] = None
                del out, x, aux, outputs, grads
            if hooks is not None:
                hooks.end("backward", i)
        # ---- embedding, only when it trains ------------------------------------------------------
        if embed_trainable:
            for mb in mbs:
                with torch.enable_grad(), autocast():
                    embeds, _, _ = _record_layer_calls(model, mb.inputs)
                if mb.grad is not None:
                    embeds.backward(mb.grad.to(embeds.dtype))
    finally:
        for layer, flag in zip(layers, checkpointing):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = flag
        if peft is not None:
            peft.clear_losses()
    counted = [i for i in sorted(taps) if i in usage]
    rows = (torch.stack([usage[i] for i in counted]).tolist() if counted else []) if taps else None
    loss_value, aux_value = torch.stack([loss_sum, aux_sum]).tolist()  # the step's one read-back of its losses
    return StepResult(loss=loss_value, aux=aux_value, usage=rows)


def micro_batch_major_step(model: nn.Module, peft, micro_batches: Sequence[dict[str, torch.Tensor]],
                           accum: int | None = None, *,
                           autocast_dtype: torch.dtype | None = None,
                           num_items: Sequence[int] | None = None) -> StepResult:
    """The plain loop, for comparison: `((loss + aux) / accum).backward()` per micro-batch (`num_items`: as
    layer_major_step's)."""
    accum = accum or len(micro_batches)
    device = next(model.parameters()).device
    loss_sum = aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    usage = None
    for m, batch in enumerate(micro_batches):
        if peft is not None:
            peft.clear_losses()
            peft.balance_begin(batch.get("attention_mask"))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            if num_items is None:
                loss = model(**batch).loss
            else:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = model.loss_function(logits, batch["labels"], vocab_size=model.config.vocab_size,
                                           num_items_in_batch=num_items[m])
        aux = peft.aux_loss() if peft is not None else None
        total = loss + aux if aux is not None else loss
        (total / accum).backward()
        loss_sum = loss_sum + loss.detach().double() / accum
        if aux is not None:
            aux_sum = aux_sum + aux.detach().double() / accum
        if peft is not None:
            stats = peft.routing_stats()
            rows = [stats[layer]["experts"] for layer in sorted(stats)]
            usage = add_usage(usage, rows)
    if peft is not None:
        peft.clear_losses()  # the routers stop recording (a held-out loss or generation may follow)
    loss_value, aux_value = torch.stack([loss_sum, aux_sum]).tolist()
    return StepResult(loss=loss_value, aux=aux_value, usage=usage)


def _global_balance_totals(counted: list[list]) -> list[list]:
    """Per micro-batch and balance term, the counts of all layers summed over the ranks (one all-reduce per term)."""
    from ..adapters.balance import global_totals

    terms = max((len(c) for c in counted), default=0)
    by_term = [global_totals([c[j] if j < len(c) else None for c in counted]) for j in range(terms)]
    return [[by_term[j][m] for j in range(terms)] for m in range(len(counted))]


def add_usage(acc: list[list[int]] | None, rows: list[list[int]] | None) -> list[list[int]] | None:
    """Tokens per expert per MoE layer, summed (None counts as nothing)."""
    if acc is None or rows is None:
        return rows if acc is None else acc
    return [[a + b for a, b in zip(r0, r1)] for r0, r1 in zip(acc, rows)]
