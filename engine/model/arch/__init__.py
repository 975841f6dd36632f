"""Model families, registered by their `model_type`: one module per family (`FAMILY`), found by name.
Adding a family = its module here + its published config.json in published/ + a test parameter."""

from __future__ import annotations

import importlib
import pkgutil

from .base import NF4_BITS, PROJECTIONS, ExpertKey, Family, MoEFacts, config_from_file, decoder_layers


def _discover() -> dict[str, Family]:
    """Every module of this package but `base` and the `_` helpers holds one family as `FAMILY`, registered by its `model_type`
    (by module name, so `moetune models` and the app list them in a stable order): adding a family is adding
    its module and its published config, nothing here."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base" or info.name.startswith("_") or info.ispkg:  # base.py, _gguf.py: helpers
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(family, Family) or family.model_type != info.name:
            raise ImportError(f"engine/model/arch/{info.name}.py must define FAMILY, a Family whose model_type is "
                              f"{info.name!r} (the module is named after the model_type it registers)")
        found[family.model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()


class UnsupportedModelError(ValueError):
    """A checkpoint whose model_type has no family module."""


def get_family(model_type: str) -> Family:
    """The family registered for a `model_type`, or a clear error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        for family in FAMILIES.values():  # a multimodal family's language model config (qwen3_5_moe_text)
            if model_type and model_type == family.text_model_type:
                return family
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}. "
            "Point model.path at a checkpoint of one of these, or add a family module in engine/model/arch/."
        ) from None


__all__ = ["FAMILIES", "NF4_BITS", "PROJECTIONS", "ExpertKey", "Family", "MoEFacts", "UnsupportedModelError",
           "config_from_file", "decoder_layers", "get_family"]
