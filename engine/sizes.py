"""What each part of a training job costs, in closed form from the model's config (no weights): the model's
shape read on the meta device (`ModelShape`), the adapters' trainable parameters per strategy, the activations a
micro-batch keeps, and the bytes expert parallelism exchanges. `engine.plan` places these on the GPU (its docstring
gives the memory model); `moetune sweep` matches candidates by these counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model.arch import MoEFacts
from .config import Config

GB = 10**9
#: host -> device bandwidth of PCIe 4.0 x16 from pinned memory
PCIE_BYTES_PER_S = 25 * GB
BF16 = 2
#: a logit in the LM head: bf16 value, its fp32 upcast for the loss, and the fp32 gradient
LOGIT_BYTES = 2 + 4 + 4
#: the linear layers `model.attention_quant: nf4` stores in NF4, by group
QUANTIZABLE_GROUPS = ("attention", "shared_expert", "other_linear")



# ---- the model, from its config -----------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model config: MoE facts, attention shapes, vocabulary, weight inventory."""

    facts: MoEFacts
    title: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    #: non-expert parameters by group: embeddings, lm_head, router, norms_biases (always bf16) and
    #: attention, shared_expert, other_linear (NF4 when model.attention_quant is nf4)
    params: dict[str, int]
    #: element counts of every linear weight NF4 can hold, by group (for exact NF4 sizes)
    linear_numels: dict[str, tuple[int, ...]]
    #: per decoder layer, Σ (in + out) over the attention projections attention LoRA wraps (q/k/v/o, MLA's own)
    attention_io: tuple[int, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def model_shape(model_config: Any) -> ModelShape:
    """The planner's view of a transformers config; builds the module tree on the meta device (no weights)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .model.arch import get_family
    from .model import is_quantizable_linear

    family = get_family(model_config.model_type)
    facts = family.facts(model_config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    if getattr(model_config, "tie_word_embeddings", False):
        model.tie_weights()  # one weight for embeddings and head (ERNIE-4.5), as the loader ties them: counted once
    # the routed experts' weights (counted by facts.expert_params); their biases (gpt-oss) stay resident, as norms
    experts = {id(getattr(family.experts(block), n)) for _, block in family.moe_blocks(model)
               for n in ("gate_up_proj", "down_proj")}
    routers = {id(family.router(block)) for _, block in family.moe_blocks(model)}
    out_emb = model.get_output_embeddings()
    params = dict.fromkeys(("embeddings", "lm_head", "router", "norms_biases", *QUANTIZABLE_GROUPS), 0)
    numels: dict[str, list[int]] = {g: [] for g in QUANTIZABLE_GROUPS}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) in experts:
                continue
            seen.add(id(p))
            if isinstance(module, torch.nn.Embedding):
                group = "embeddings"
            elif module is out_emb:
                group = "lm_head"
            elif id(module) in routers or (isinstance(module, torch.nn.Linear)
                                           and not is_quantizable_linear(name, module)):
                group = "router"
            elif pname == "weight" and is_quantizable_linear(name, module):
                group = "attention" if ".self_attn." in f".{name}." else \
                    "shared_expert" if any(f".{s}." in f".{name}." for s in ("shared_expert", "shared_experts")) \
                    else "other_linear"
                numels[group].append(p.numel())
            else:
                group = "norms_biases"
            params[group] += p.numel()
    n_heads, n_kv_heads, head_dim = family.attention_shape(model_config)
    attns = [getattr(layer, "self_attn", None) for layer in family.decoder_layers(model)]  # None: a linear-attention layer
    attention_io = tuple(sum(getattr(a, n).in_features + getattr(a, n).out_features for n in family.attention_modules(a))
                         for a in attns)
    return ModelShape(
        facts=facts, title=family.title,
        num_heads=n_heads, num_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=int(model_config.vocab_size), params=params,
        linear_numels={g: tuple(v) for g, v in numels.items()}, attention_io=attention_io)


# ---- closed forms --------------------------------------------------------------------------------
def _adapter(kind: str, d_in: int, d_out: int, rank: int) -> int:
    """Parameters of one PEFT expert: lora / bottleneck r·(in + out), gated r·(2·in + out)."""
    return rank * (2 * d_in + d_out) if kind == "gated" else rank * (d_in + d_out)


def attention_layers(cfg: Config, shape: ModelShape) -> list[int]:
    """Layers that get attention LoRA: every decoder layer for `routing.layers: all`, else the selected ones."""
    if not cfg.routing.attention_lora:
        return []
    return list(range(shape.facts.num_layers)) if cfg.routing.layers == "all" else cfg.layer_indices(shape.facts.moe_layers)


def adapter_params(cfg: Config, shape: ModelShape) -> dict[str, int]:
    """Trainable parameters by group (the strategy's name, "router", "attention"), in closed form.

    Per selected MoE layer (H hidden, I expert intermediate, E experts, N = routing.num_adapters, r = rank):
    shared = one H→H adapter; dense = N adapters; routed = N adapters + its router H·N; embedded = E
    adapters (parallel), or LoRA inside each expert on gate, up (H→I) and down (I→H) = 3·E·r·(H + I).
    An H→H adapter: lora 2·H·r, bottleneck 2·H·r, gated 3·H·r. `routing.train_router` adds the MoE's
    router E·H; `attention_lora` adds LoRA on q, k, v, o: r·(H+q) + 2·r·(H+kv) + r·(q+H) per layer.
    """
    a, r = cfg.adapter, cfg.routing
    H, I, E, N = shape.facts.hidden_size, shape.facts.expert_intermediate_size, shape.facts.num_experts, r.num_adapters
    layers = len(cfg.layer_indices(shape.facts.moe_layers))
    one = _adapter(a.kind, H, H, a.rank)
    per_layer = {
        "none": 0,
        "shared": one,
        "dense": N * one,
        "routed": N * one + H * N,
        "embedded": (3 * E * a.rank * (H + I)) if a.placement == "inside" else E * one,
    }[r.strategy]
    out = {}
    if per_layer:
        out[r.strategy] = layers * per_layer
    if r.train_router:
        out["router"] = layers * E * H
    attn = attention_layers(cfg, shape)
    if attn and shape.attention_io:  # r·(in + out) of each projection attention LoRA wraps (MLA has its own)
        out["attention"] = a.rank * sum(shape.attention_io[i] for i in attn)
    elif attn:
        q, kv = shape.q_dim, shape.kv_dim
        out["attention"] = len(attn) * a.rank * ((H + q) + 2 * (H + kv) + (q + H))
    return out


def adapter_params_per_gpu(cfg: Config, shape: ModelShape) -> int:
    """Trainable parameters one GPU holds: all of `adapter_params`, but 1/P of the embedded strategy's per-expert
    adapters under `train.expert_parallel: P`."""
    params = adapter_params(cfg, shape)
    sharded = params.get("embedded", 0)
    return sum(params.values()) - sharded + sharded // cfg.train.expert_parallel


def activation_bytes(cfg: Config, shape: ModelShape, layer_major: bool = False) -> dict[str, int]:
    """Activation memory of a step at train.micro_batch × data.max_len tokens a micro-batch, by part.

    Per token of one decoder layer (bf16, 2 bytes): attention = norm out, q, k, v, rotated q and k,
    attention out, o_proj out (+ fp32 log-sum-exp per head); MoE = norm out, router logits and
    probabilities (fp32, E each), and for each of the top-k routed pairs the gathered input, gate_up
    out (2I), act(gate) and act·up (I each), the expert output, then the weighted sum; the shared
    expert's intermediates; the adapters' intermediates; under `train.expert_parallel` > 1 the token
    exchange's buffers (each routed pair's input sent and received, its output sent back and received: 4·H).

    Micro-batch-major (experts resident, one micro-batch at a time): with gradient checkpointing one layer's
    input kept per layer + one layer's activations ×2 (saved + gradients); without: every layer's.
    Layer-major (`layer_major`: offloaded experts, `engine.training.steps.layer_major_step`): the step runs every
    micro-batch through a layer before the next, so until the backward sweep it keeps every layer's input for
    ALL train.grad_accum micro-batches (`layer_inputs`), plus per micro-batch its current hidden state (forward)
    or incoming gradient (backward), the arguments its layers are called with (rotary cos and sin, the attention
    mask counted as a bool B×T×T, the token ids, mask and labels) (`micro_batches`); one micro-batch's layer is
    recomputed at a time (`layer_activations`, checkpointed whatever train.gradient_checkpointing says).
    Plus the logits of one micro-batch (LOGIT_BYTES each).
    """
    a, r = cfg.adapter, cfg.routing
    tokens = cfg.train.micro_batch * cfg.data.max_len
    H, I, E, k = shape.facts.hidden_size, shape.facts.expert_intermediate_size, shape.facts.num_experts, shape.facts.top_k
    q, kv, Is, rank = shape.q_dim, shape.kv_dim, shape.facts.shared_expert_intermediate_size, a.rank
    attn = BF16 * (H + 2 * q + 3 * kv + q + H) + 4 * shape.num_heads
    moe = BF16 * H + 2 * 4 * E + k * BF16 * (H + 2 * I + 2 * I + H) + BF16 * H
    if cfg.train.expert_parallel > 1:
        moe += k * BF16 * 4 * H
    shared = BF16 * (4 * Is + H + 1) if Is else 0
    inner = {"lora": 1, "bottleneck": 2, "gated": 3}[a.kind] * rank  # rank-sized tensors an adapter keeps
    adapters = {
        "none": 0,
        "shared": BF16 * (inner + H),
        "dense": BF16 * r.num_adapters * (inner + H),
        "routed": 4 * r.num_adapters + r.top_k * BF16 * (H + inner + H),
        "embedded": k * BF16 * ((3 * rank + 2 * I + H) if a.placement == "inside" else (inner + H)),
    }[r.strategy]
    if r.attention_lora:
        adapters += BF16 * (4 * rank + q + 2 * kv + H)
    per_layer_token = attn + moe + shared + adapters
    logits = tokens * shape.vocab_size * LOGIT_BYTES
    L = shape.facts.num_layers
    if layer_major:
        accum, batch, seq = cfg.train.grad_accum, cfg.train.micro_batch, cfg.data.max_len
        per_micro_batch = (tokens * H * BF16  # the hidden state it carries (forward) / its gradient (backward)
                           + 2 * tokens * shape.head_dim * BF16  # rotary cos and sin
                           + batch * seq * seq  # an attention mask as bool [B, 1, T, T] (none for unpadded SDPA)
                           + 3 * tokens * 8)  # input ids, attention mask, labels (int64)
        return {"layer_inputs": L * accum * tokens * H * BF16, "micro_batches": accum * per_micro_batch,
                "layer_activations": 2 * tokens * per_layer_token, "logits": logits}
    if cfg.train.gradient_checkpointing:
        kept = L * tokens * H * BF16
        layer = 2 * tokens * per_layer_token
    else:
        kept = 0
        layer = (L + 1) * tokens * per_layer_token
    return {"layer_inputs": kept, "layer_activations": layer, "logits": logits}


def all_to_all_bytes(cfg: Config, shape: ModelShape) -> int:
    """Bytes one GPU sends to the others a step under `train.expert_parallel: P` (0 when P is 1): each MoE
    layer's routed pairs (train.micro_batch × data.max_len × train.grad_accum tokens × top-k) go to their
    experts' GPU (a share (P-1)/P of them leaves this one, balanced routing) in bf16 and their outputs come back;
    the same again in the backward (gradients) and, with gradient checkpointing, in the recompute."""
    ep = cfg.train.expert_parallel
    if ep == 1:
        return 0
    pairs = cfg.train.micro_batch * cfg.data.max_len * cfg.train.grad_accum * shape.facts.top_k
    passes = 3 if cfg.train.gradient_checkpointing else 2
    per_layer = 2 * pairs * shape.facts.hidden_size * BF16 * passes  # there and back, each pass
    return len(shape.facts.moe_layers) * per_layer * (ep - 1) // ep


def host_layer_bytes(cfg: Config, shape: ModelShape, experts: int) -> int:
    """Host bytes one offloaded MoE layer of `experts` experts pins: its arena (`engine.model.host_arena`), exactly
    what `NF4ExpertStore.pin_memory` / `DenseHostStore` allocate and page-lock — records padded to 16-byte fields,
    the arena to whole pages, never torch's power-of-two pinned blocks."""
    import torch

    from .model.host_arena import arena_nbytes
    from .model.stores import PARTS, NF4ExpertStore

    H, I = shape.facts.hidden_size, shape.facts.expert_intermediate_size
    if cfg.model.quant == "nf4":
        shapes = NF4ExpertStore(experts, H, I, allocate=False).expected_shapes()
        per = {k: (s[1:], d) for k, (s, d) in shapes.items() if k.startswith(PARTS)}
        return arena_nbytes(per, experts, {k: v for k, v in shapes.items() if not k.startswith(PARTS)})
    return arena_nbytes({"gate_up": ((2 * I, H), torch.bfloat16), "down": ((H, I), torch.bfloat16)}, experts)


def fmt_gb(n: float) -> str:
    """Bytes as GB (10^9) with two decimals, as every plan figure is shown."""
    return f"{n / GB:.2f} GB"
