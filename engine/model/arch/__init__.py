"""Model families, registered by their `model_type`. Adding a family = one module here + a test."""

from __future__ import annotations

from .base import NF4_BITS, PROJECTIONS, ExpertKey, Family, MoEFacts, config_from_file, decoder_layers
from .deepseek_v2 import FAMILY as _deepseek_v2
from .deepseek_v3 import FAMILY as _deepseek_v3
from .glm4_moe import FAMILY as _glm4_moe
from .ernie4_5_moe import FAMILY as _ernie4_5_moe
from .gpt_oss import FAMILY as _gpt_oss
from .qwen3_5_moe import FAMILY as _qwen3_5_moe
from .mixtral import FAMILY as _mixtral
from .olmoe import FAMILY as _olmoe
from .qwen2_moe import FAMILY as _qwen2_moe
from .qwen3_moe import FAMILY as _qwen3_moe

FAMILIES: dict[str, Family] = {f.model_type: f for f in (_olmoe, _mixtral, _qwen2_moe, _qwen3_moe, _gpt_oss,
                                                         _ernie4_5_moe, _deepseek_v2, _deepseek_v3, _glm4_moe,
                                                         _qwen3_5_moe)}


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
            "Point model.path at a checkpoint of one of these, or add a family module in engine/arch/."
        ) from None


__all__ = ["FAMILIES", "NF4_BITS", "PROJECTIONS", "ExpertKey", "Family", "MoEFacts", "UnsupportedModelError",
           "config_from_file", "decoder_layers", "get_family"]
