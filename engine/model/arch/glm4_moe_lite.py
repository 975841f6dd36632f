"""GLM-4.7-Flash (zai-org/GLM-4.7-Flash, transformers' `glm4_moe_lite`: 47 layers, 64 experts top-4 + 1 shared
expert, a dense first layer): DeepSeek-V3's Multi-head Latent Attention (q_a_proj / q_b_proj, kv_a_proj_with_mqa,
kv_b_proj, o_proj; interleaved RoPE on 64 of each head's 256 query/key dims) with GLM-4.5's router, itself
DeepSeek-V3's (sigmoid scores, `e_score_correction_bias` for the choice, gates renormalised × 1.8). Which layers are
sparse is `mlp_layer_types` (transformers' default: dense first, as `first_k_dense_replace: 1` in the hub's
config). The Multi-Token-Prediction layer (`model.layers.47.*`, `num_nextn_predict_layers`) is skipped.

llama.cpp runs it as `deepseek2` (its converter's Glm4MoeLiteModel is DeepSeek-V2's with GLM's vocabulary): the
GGUF is DeepSeek-V3's, with the leading dense layer count taken from `mlp_layer_types`.
"""

from __future__ import annotations

from gguf.constants import Keys

from .deepseek_v3 import DeepseekV3Family


class Glm4MoeLiteFamily(DeepseekV3Family):
    model_type = "glm4_moe_lite"
    title = "GLM-4.7-Flash"
    examples = ("zai-org/GLM-4.7-Flash",)
    published = "GLM-4.7-Flash"

    def moe_layers(self, cfg):
        return tuple(i for i, kind in enumerate(cfg.mlp_layer_types) if kind == "sparse")

    def _leading_dense(self, cfg) -> int:
        kinds = list(cfg.mlp_layer_types)
        return kinds.index("sparse") if "sparse" in kinds else len(kinds)

    def gguf_moe_hparams(self, cfg):
        return {**super().gguf_moe_hparams(_WithLeadingDense(cfg, self._leading_dense(cfg))),
                Keys.LLM.LEADING_DENSE_BLOCK_COUNT: self._leading_dense(cfg)}

    def gguf_problems(self, cfg):
        problems = super().gguf_problems(cfg)
        lead = self._leading_dense(cfg)
        if any(kind != "sparse" for kind in list(cfg.mlp_layer_types)[lead:]):
            problems.append(f"mlp_layer_types {list(cfg.mlp_layer_types)} has dense layers after sparse ones, but "
                            "llama.cpp's 'deepseek2' graph has dense layers only before the first MoE layer")
        return problems

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        kwargs = super().tiny_config_kwargs(layers, hidden, experts, top_k, vocab)
        # one group and a dense first layer, as the release (whose config.json says both ways); MLA with a query LoRA
        kwargs.update(n_group=1, topk_group=1, mlp_layer_types=["dense"] + ["sparse"] * layers,
                      routed_scaling_factor=1.8)
        return kwargs


class _WithLeadingDense:
    """A config seen with `first_k_dense_replace` set (DeepSeek's GGUF keys read it; GLM-4.7-Flash's config says
    which layers are dense in `mlp_layer_types`)."""

    def __init__(self, cfg, lead: int):
        self._cfg, self.first_k_dense_replace = cfg, lead

    def __getattr__(self, name):
        return getattr(self._cfg, name)


FAMILY = Glm4MoeLiteFamily()
