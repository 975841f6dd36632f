"""The run configuration: one dataclass per section, YAML in and out, `--set a.b=v` overrides, and
validation whose errors name the field, the bad value and what is allowed.

Each field carries its help text and limits in `metadata` (help, choices, min, max), which the
validator, the CLI and the app all read, so a rule is written once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config value a user wrote that cannot work; the message names the field and the fix."""


def _f(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None) -> Any:
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("", "local HF checkpoint directory (config.json + *.safetensors + tokenizer)")
    quant: str = _f("nf4", "how frozen expert weights are stored", choices=("nf4", "bf16"))
    attention_quant: str = _f("none", "store attention and other linear weights in NF4 too (QLoRA style)",
                              choices=("none", "nf4"))
    expert_backend: str = _f("auto", "how the frozen experts compute: torch (a layer's routed experts dequantised "
                             "in one batched call, then one grouped GEMM per projection), grouped-nf4-gemm (NF4 "
                             "decoded inside the grouped GEMM; optional package, CUDA, resident NF4 experts), or "
                             "auto (grouped-nf4-gemm where installed and usable, else torch)",
                             choices=("auto", "torch", "grouped-nf4-gemm"))


@dataclass
class AdapterConfig:
    kind: str = _f("lora", "adapter module: LoRA, bottleneck (SiLU) or gated (rank-r SwiGLU)",
                   choices=("lora", "bottleneck", "gated"))
    placement: str = _f("parallel", "beside the MoE block / expert (parallel), or LoRA on each expert's "
                        "projections (inside; lora + embedded only)", choices=("parallel", "inside"))
    rank: int = _f(8, "adapter rank r (LoRA rank, bottleneck width, gated intermediate size)", min=1, max=4096)
    alpha: float = _f(16.0, "LoRA scaling numerator: the update is scaled by alpha / rank", min=0.0)
    dropout: float = _f(0.0, "dropout on the adapter input", min=0.0, max=0.99)
    init: str = _f("kaiming", "how adapters start. kaiming: PEFT's default (LoRA A / W_down / W_g, W_u kaiming-"
                   "uniform, std 1/sqrt(3·d_in); B / W_up / W_d zero), suits lr around 1e-4 to 1e-3 on real models. "
                   "perft: the PERFT paper's code (A / W_down / W_g, W_u ~ N(0, 2/r), B / W_up / W_d ~ 1e-6·N(0, 1), "
                   "routed router ~ N(0, 0.02)), an A far larger than kaiming's, so it trains at the paper's lr "
                   "1e-5 (OLMoE) / 2e-5 (Mixtral). Attention LoRA keeps kaiming either way, as the paper's q/v LoRA "
                   "baseline did", choices=("kaiming", "perft"))


@dataclass
class RoutingConfig:
    strategy: str = _f("embedded", "how adapters follow the MoE: shared, dense, routed (own router), "
                       "embedded (the MoE's own routing), or none (attention LoRA only)",
                       choices=("shared", "dense", "routed", "embedded", "none"))
    num_adapters: int = _f(4, "number of adapters N for dense and routed", min=1, max=1024)
    top_k: int = _f(2, "adapters each token uses (routed)", min=1, max=1024)
    renormalize: bool = _f(True, "renormalise the routed strategy's top-k gates to sum to 1")
    balance_loss: float = _f(0.0, "load-balancing loss coefficient for the routed strategy's router", min=0.0)
    base_balance_loss: float = _f(0.0, "load-balancing loss coefficient for the MoE's own router", min=0.0)
    train_router: bool = _f(False, "train the MoE's own router (frozen by default)")
    attention_lora: bool = _f(False, "add LoRA on attention q/k/v/o (the baseline; combinable)")
    layers: Union[str, list] = _f("all", "MoE layers that get adapters: 'all', a list of layer indices, "
                                  "or 'every:N' for every N-th layer")


@dataclass
class DataConfig:
    train: str = _f("", "training data: a file (JSON, JSONL, CSV, Parquet), a saved HF dataset folder, "
                    "or a name from the dataset registry")
    eval: str = _f("", "held-out data scored during training (optional)")
    template: str = _f("alpaca", "prompt template", choices=("alpaca", "llm-adapters", "chat"))
    max_len: int = _f(512, "cut-off length in tokens", min=8, max=131072)
    train_on_prompt: bool = _f(False, "take the training loss on every token, prompt and template included (the "
                               "PERFT paper's code: train_on_inputs=True), not on the response only; the held-out "
                               "loss of data.eval stays on the response, so runs compare either way")


@dataclass
class TrainConfig:
    max_steps: int = _f(100, "optimizer steps (ignored when epochs is set)", min=1)
    epochs: Union[float, None] = _f(None, "passes over the training data (empty: use max_steps)", min=0.01)
    lr: float = _f(3.0e-4, "peak learning rate (AdamW)", min=0.0, max=1.0)
    warmup_steps: int = _f(0, "linear warm-up steps", min=0)
    scheduler: str = _f("cosine", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", min=0.0)
    micro_batch: int = _f(4, "sequences per forward pass", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    seed: int = _f(0, "random seed for init, data order and dropout", min=0)
    save_every: int = _f(50, "checkpoint every N optimizer steps", min=1)
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory")
    expert_parallel: int = _f(1, "split every MoE layer's experts (and their adapters) across this many GPUs, "
                              "tokens sent to their experts' GPU and back; must equal the number of GPUs and "
                              "divide the number of experts (1: every GPU holds all experts)", min=1)


@dataclass
class MemoryConfig:
    gpu_gb: Union[float, None] = _f(None, "GPU memory budget in GB (empty: the device's free memory)", min=0.1)
    offload: str = _f("auto", "keep experts in CPU memory behind a GPU cache and train layer by layer: auto "
                      "(when the planner says the budget needs it), on, or off", choices=("auto", "on", "off"))
    cache_slots: Union[int, None] = _f(None, "experts the GPU cache holds when offloading (empty: the planner's "
                                       "number)", min=1)


@dataclass
class EvalConfig:
    benchmarks: list = _f([], "benchmarks to run after training (names or test.json files)")
    limit: Union[int, None] = _f(None, "rows per benchmark (empty: all)", min=1)
    batch_size: int = _f(8, "prompts per generation batch", min=1)
    num_beams: int = _f(1, "beam width for generation (the paper uses 4)", min=1, max=16)


@dataclass
class ExportConfig:
    format: str = _f("hf", "export format (gguf-lora: the LoRA alone, for a base GGUF)",
                     choices=("hf", "peft", "gguf", "gguf-lora"))
    dtype: str = _f("f16", "tensor type of the export", choices=("f16", "bf16", "q8_0"))


@dataclass
class Config:
    title: str = _f("", "a short name for this config (presets show it)")
    description: str = _f("", "one line saying what this config does")
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        """Plain dict of the whole config (YAML/JSON ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML text, in section order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def layer_indices(self, moe_layers: tuple[int, ...]) -> list[int]:
        """The MoE layers `routing.layers` selects out of a model's MoE layers."""
        sel = self.routing.layers
        if sel == "all":
            return list(moe_layers)
        if isinstance(sel, str):  # every:N, validated
            n = int(sel.split(":")[1])
            return [layer for i, layer in enumerate(moe_layers) if i % n == 0]
        bad = [i for i in sel if i not in moe_layers]
        if bad:
            raise ConfigError(f"routing.layers: {bad} are not MoE layers of this model; "
                              f"its MoE layers are {list(moe_layers)}.")
        return sorted(sel)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def from_dict(data: dict | None) -> Config:
    """Build and validate a Config from a plain dict (unknown keys are errors)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, not {type(data).__name__}.")
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply `a.b=v` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping of sections (model:, adapter:, routing:, ...), "
                          f"not a {type(data).__name__}.")
    return from_dict(apply_overrides(data, overrides or []))


def save(cfg: Config, path: str | Path) -> None:
    """Write a config as YAML, atomically."""
    from .io import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a config dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. routing.top_k=2.")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.lr=1e-4.")
        section, name = parts
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data.get(section)
        node = dict(node) if isinstance(node, dict) else ({} if node is None else node)
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {section} is not a section.")
        node[name] = value
        data[section] = node
    return data


# ---- building and checking -------------------------------------------------------------------

def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}; known keys: {', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, typ = data[name], hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, typ, f.metadata)
    return cls(**kwargs)


def _check_value(where: str, value: Any, typ: Any, meta: dict) -> Any:
    options = typing.get_args(typ) if typing.get_origin(typ) in (Union, types.UnionType) else (typ,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: a value is required here, got null.")
    for opt in options:
        if opt is type(None):
            continue
        ok, converted = _coerce(value, opt)
        if ok:
            value = converted
            break
    else:
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r} ({type(value).__name__}).")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}.")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number; give a finite value"
                          + (f" between {lo} and {hi}." if lo is not None and hi is not None else "."))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(f"{where}: {value!r} is out of range; it must be at least {lo}.")
        if hi is not None and value > hi:
            raise ConfigError(f"{where}: {value!r} is out of range; it must be at most {hi}.")
    return value


def _coerce(value: Any, typ: Any) -> tuple[bool, Any]:
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as a number
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if typ is str:
        return isinstance(value, str), value
    if typ is list or typing.get_origin(typ) is list:
        return isinstance(value, list), list(value) if isinstance(value, list) else value
    return isinstance(value, typ), value


def _type_name(t: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        t, getattr(t, "__name__", str(t)))


def validate(cfg: Config) -> None:
    """Rules across fields; raises ConfigError naming the field and the fix."""
    r, a = cfg.routing, cfg.adapter
    if isinstance(r.layers, str) and r.layers != "all":
        head, _, n = r.layers.partition(":")
        if head != "every" or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"routing.layers: {r.layers!r} is not allowed; write 'all', a list of layer "
                              "indices like [0, 2], or 'every:N' with N >= 1.")
    if isinstance(r.layers, list):
        if not r.layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in r.layers):
            raise ConfigError(f"routing.layers: {r.layers!r} must be a non-empty list of layer indices >= 0.")
    if r.strategy == "routed" and r.top_k > r.num_adapters:
        raise ConfigError(f"routing.top_k: {r.top_k} is more than routing.num_adapters ({r.num_adapters}); "
                          "choose top_k <= num_adapters.")
    if a.placement == "inside" and not (a.kind == "lora" and r.strategy == "embedded"):
        raise ConfigError(f"adapter.placement: 'inside' needs adapter.kind lora and routing.strategy embedded "
                          f"(got kind {a.kind!r}, strategy {r.strategy!r}); use placement 'parallel'.")
    if r.strategy == "none" and not r.attention_lora:
        raise ConfigError("routing.strategy: 'none' trains nothing unless routing.attention_lora is true; "
                          "set attention_lora: true or pick a strategy.")


def field_help(section: str, name: str) -> dict:
    """The metadata (help, choices, min, max) of one field, for the CLI and the app."""
    cls = SECTIONS[section]
    for f in dataclasses.fields(cls):
        if f.name == name:
            return dict(f.metadata)
    raise KeyError(f"{section}.{name}")


def check_expert_parallel(expert_parallel: int, world_size: int | None = None,
                          num_experts: int | None = None) -> None:
    """Raise a ConfigError naming `train.expert_parallel` when it does not divide the world size or the number
    of experts (either check is skipped when its number is None)."""
    if expert_parallel < 1:
        raise ConfigError(f"train.expert_parallel: {expert_parallel} must be at least 1.")
    if world_size is not None and expert_parallel > 1 and world_size != expert_parallel:
        # the trainer splits the experts over every rank of the job (engine.training.distributed.shard_experts); a hybrid
        # (world 4, expert_parallel 2) would need the shards' gradients all-reduced across replicas, not built
        raise ConfigError(f"train.expert_parallel: {expert_parallel} needs a job of exactly {expert_parallel} ranks "
                          f"(this one has {world_size}); use --gpus {expert_parallel}, or set "
                          "train.expert_parallel: 1 (data parallel only).")
    if num_experts is not None and num_experts % expert_parallel:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConfigError(f"train.expert_parallel: {expert_parallel} does not divide the model's {num_experts} "
                          f"experts; choose one of {', '.join(map(str, divisors))}.")
