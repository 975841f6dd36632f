"""Config fields -> Gradio widgets, built from the dataclass metadata of `engine.config` (help text,
choices, min, max), so a choice or a limit is written once. A widget's id is `section.key`; its
elem_id is `cfg-section-key` (the browser test finds widgets by it).

Like LLaMA-Factory's `manager.py`: `Controls` maps ids to widgets and turns their values back into a
config dict; fields with no widget keep the preset's value.
"""

from __future__ import annotations

import dataclasses
import shlex
import types
import typing
from typing import Any, Union

import yaml

from engine import config as C

#: How long to train: one choice, `epochs` (train.epochs) or `steps` (train.max_steps, epochs null), and its number
#: (pseudo fields: the form never shows a number that is not used).
LENGTH_UNIT, LENGTH = "train.length_unit", "train.length"
PSEUDO = (LENGTH_UNIT, LENGTH)
#: The Train tab's fields shown at once (the length pair among them), in order.
BASICS: list[str] = ["routing.strategy", "adapter.kind", "adapter.rank", "train.lr",
                     LENGTH_UNIT, LENGTH, "data.template", "data.max_len"]
#: The folded groups of the other fields, in order. Fields not listed keep the preset's value.
GROUPS: dict[str, list[str]] = {
    "Adapter": ["adapter.placement", "adapter.alpha", "adapter.dropout", "adapter.init"],
    "Routing": ["routing.num_adapters", "routing.top_k", "routing.layers", "routing.balance_loss",
                "routing.attention_lora", "routing.renormalize", "routing.base_balance_loss", "routing.train_router"],
    "Hyperparameters": ["train.micro_batch", "train.grad_accum", "train.warmup_steps", "train.scheduler",
                        "train.weight_decay", "train.max_grad_norm", "train.seed", "train.save_every",
                        "train.gradient_checkpointing"],
    "Data": ["data.eval", "data.train_on_prompt"],
    "Model and memory": ["model.quant", "model.attention_quant", "memory.offload", "memory.cache_slots"],
}


def length_of(data: dict) -> tuple[str, Any]:
    """(unit, number) of a config dict: its epochs when set, else its max steps."""
    epochs = get(data, "train.epochs")
    if epochs not in (None, ""):
        return "epochs", int(epochs) if float(epochs).is_integer() else epochs
    return "steps", get(data, "train.max_steps")


def put_length(data: dict, unit: str, value: Any) -> None:
    """Set train.epochs / train.max_steps of a config dict from the one choice (in place)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if unit == "steps":
        put(data, "train.epochs", None)
        put(data, "train.max_steps", "" if value is None else value)
    else:
        put(data, "train.epochs", "" if value is None else value)

_LABELS = {"lr": "learning rate", "num_adapters": "number of adapters", "top_k": "top-k",
           "max_len": "cut-off length", "gpu_gb": "GPU budget (GB)", "attention_lora": "attention LoRA",
           "train_on_prompt": "loss on the prompt too",
           "balance_loss": "balance loss", "base_balance_loss": "base-router balance loss",
           "micro_batch": "micro-batch", "grad_accum": "gradient accumulation", "max_steps": "max steps",
           "warmup_steps": "warm-up steps", "max_grad_norm": "max grad norm", "save_every": "save every (steps)",
           "attention_quant": "attention quant", "eval": "eval data (optional)",
           "offload": "offload experts", "cache_slots": "GPU cache (experts)"}


def field_info(fid: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field of an id `section.key` and its type."""
    section, name = fid.split(".")
    cls = typing.get_type_hints(C.Config)[section]  # C.SECTIONS holds the annotation strings
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f, hints[name]
    raise KeyError(fid)


def _options(typ: Any) -> tuple:
    if typing.get_origin(typ) in (Union, types.UnionType):
        return typing.get_args(typ)
    return (typ,)


def label(fid: str) -> str:
    """A readable label of a field."""
    name = fid.split(".")[1]
    return _LABELS.get(name, name.replace("_", " "))


def elem_id(fid: str) -> str:
    """The HTML id of a field's widget."""
    return "cfg-" + fid.replace(".", "-").replace("_", "-")


def make_widget(fid: str, **overrides):
    """A Gradio widget for one config field, from its type and metadata."""
    import gradio as gr

    f, typ = field_info(fid)
    meta, opts = f.metadata, _options(typ)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw = dict(label=label(fid), info=meta.get("help"), elem_id=elem_id(fid), interactive=True)
    kw.update(overrides)
    default = kw.pop("value", default)
    if meta.get("choices"):
        return gr.Dropdown(choices=list(meta["choices"]), value=default, **kw)
    if bool in opts:
        return gr.Checkbox(value=default, **kw)
    numeric = [o for o in opts if o in (int, float)]
    limits = [f"≥ {_num(meta['min'])}" if meta.get("min") is not None else "",
              f"≤ {_num(meta['max'])}" if meta.get("max") is not None else ""]
    if any(limits) and "info" not in overrides:
        kw["info"] = f"{kw['info']} ({', '.join(x for x in limits if x)})"
    if numeric and str not in opts and type(None) not in opts:
        # no minimum/maximum on the widget: the config's validation names the field and the fix
        is_int = numeric == [int]
        return gr.Number(value=default, precision=0 if is_int else None, step=1 if is_int else None, **kw)
    if numeric and str not in opts:  # optional number: empty text is null
        kw.setdefault("placeholder", "empty: the default (see the help)")
    return gr.Textbox(value=to_widget(fid, default), **kw)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def to_widget(fid: str, value: Any) -> Any:
    """A config value as its widget shows it (lists as YAML flow text)."""
    if isinstance(value, list):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if value is None:
        return ""
    return value


def from_widget(fid: str, value: Any) -> Any:
    """A widget value as the config wants it (numbers typed, empty optional numbers as null)."""
    _, typ = field_info(fid)
    opts = _options(typ)
    if value is None or (isinstance(value, str) and not value.strip() and type(None) in opts):
        return None
    if opts == (int,) and isinstance(value, float) and value.is_integer():
        return int(value)
    if list in opts and isinstance(value, str):  # routing.layers: all | every:N | [0, 2]
        text = value.strip()
        return yaml.safe_load(text) if text.startswith("[") else text
    if isinstance(value, str) and (float in opts or int in opts) and str not in opts:
        text = value.strip()
        try:
            return int(text) if int in opts and text.lstrip("-").isdigit() else float(text)
        except ValueError:
            return text  # the config's validation reports it, naming the field
    return value


def get(data: dict, fid: str) -> Any:
    """The value of `section.key` in a config dict."""
    section, name = fid.split(".")
    return (data.get(section) or {}).get(name)


def put(data: dict, fid: str, value: Any) -> None:
    """Set `section.key` in a config dict (in place)."""
    section, name = fid.split(".")
    data.setdefault(section, {})[name] = value


class Controls:
    """The config widgets of the app by id, and the conversions between their values and a config."""

    def __init__(self):
        self.widgets: dict[str, Any] = {}

    def add(self, fid: str, widget) -> Any:
        """Register a widget built elsewhere (e.g. the model picker) under a field id."""
        self.widgets[fid] = widget
        return widget

    def build(self, fid: str, **overrides):
        """Build and register the widget of a field."""
        return self.add(fid, make_widget(fid, **overrides))

    @property
    def ids(self) -> list[str]:
        """Field ids in registration order (the order of `components` and of values)."""
        return list(self.widgets)

    @property
    def components(self) -> list:
        """The widgets, in the order of `ids`."""
        return list(self.widgets.values())

    def values_of(self, data: dict) -> list:
        """Widget values of a config dict, in the order of `ids`."""
        unit, length = length_of(data)
        pseudo = {LENGTH_UNIT: unit, LENGTH: length}
        return [pseudo[fid] if fid in pseudo else to_widget(fid, get(data, fid)) for fid in self.ids]

    def to_dict(self, base: dict, values: list) -> dict:
        """A config dict: `base` (the preset) with every widget's value put in."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
        given = dict(zip(self.ids, values))
        for fid, value in given.items():
            if fid not in PSEUDO:
                put(data, fid, from_widget(fid, value))
        if LENGTH in given:
            put_length(data, given.get(LENGTH_UNIT) or "epochs", given[LENGTH])
        return data


def config_dict(data: dict) -> dict:
    """A config dict validated and completed with defaults (raises ConfigError naming the field)."""
    return C.from_dict(data).to_dict()


def overrides(base: dict, data: dict) -> list[str]:
    """`section.key=value` items that turn config `base` into `data` (both complete dicts)."""
    out = []
    for section, fields in data.items():
        if not isinstance(fields, dict):
            continue
        for key, value in fields.items():
            if (base.get(section) or {}).get(key) != value:
                text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
                out.append(f"{section}.{key}={text}")
    return out


def command_preview(preset: str | None, base: dict, data: dict, out: str) -> str:
    """The `moetune train` command line equivalent to the app's settings (run from the project root)."""
    parts = ["moetune", "train", f"presets/{preset}.yaml" if preset else "config.yaml"]
    for item in overrides(base, data) if preset else []:
        parts += ["--set", item]
    parts += ["--out", out]
    return " ".join(shlex.quote(p) for p in parts)
