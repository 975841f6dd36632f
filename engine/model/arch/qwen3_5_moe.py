"""Qwen3.5-MoE (Qwen/Qwen3.5-35B-A3B): 256 experts, top-8 of a softmax router, always renormalised, plus one
shared expert scaled by a per-token sigmoid gate (as Qwen2-MoE); hybrid attention: three Gated DeltaNet
(linear-attention) layers to one full-attention layer, every layer with experts.

The published checkpoint is the multimodal one (`Qwen3_5MoeForConditionalGeneration`): the language model under
`model.language_model.…`, a vision tower under `model.visual.…`, a Multi-Token-Prediction head under `mtp.…`.
MoETune builds and trains the language model alone (transformers' `Qwen3_5MoeForCausalLM`, from `text_config`):
the vision tower and the MTP head are not loaded; the hf export writes the hub's multimodal layout with the
vision tower copied unchanged (so the merged model still reads images) and without the MTP head. The linear-
attention layers run on transformers' own path (its PyTorch fallback without flash-linear-attention); attention
LoRA applies to the full-attention layers only, which have q/k/v/o (`parameter_report()["by_layer"]` shows which).
"""

from __future__ import annotations

from .base import Family
from .qwen2_moe import Qwen2MoeFamily


class Qwen35MoeFamily(Qwen2MoeFamily):
    model_type = "qwen3_5_moe"
    text_model_type = "qwen3_5_moe_text"
    title = "Qwen3.5-MoE"
    examples = ("Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.6-35B-A3B")
    published = "Qwen3.5-35B-A3B"
    expert_key_template = "model.language_model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    renames = {"model.language_model.": "model."}
    gguf_arch = "qwen35moe"
    gguf_missing = ("MoETune's GGUF writer does not map Qwen3.5's Gated DeltaNet (linear-attention) tensors to "
                    "llama.cpp's 'qwen35moe' ones yet (llama.cpp runs the arch: convert the --format hf export with "
                    "its convert_hf_to_gguf.py)")

    def peft_name(self, name):
        # transformers loads this checkpoint's language model as Qwen3_5MoeForCausalLM (model.layers.…), the model
        # a PEFT adapter of it is applied to
        return self.rename(name)

    def parse_expert_key(self, name):
        key = super().parse_expert_key(name)
        if key is None and name.startswith("model.layers."):  # the language model's own (PEFT) name
            key = super().parse_expert_key(name.replace("model.", "model.language_model.", 1))
        return key

    def model_config(self, cfg):
        return cfg.text_config if getattr(cfg, "model_type", "") == self.model_type else cfg

    def config_json_section(self, raw):
        return raw.get("text_config", raw)

    def norm_topk_prob(self, cfg):
        return True  # transformers' Qwen3_5MoeTopKRouter always renormalises the top-k

    def moe_layers(self, cfg):
        return tuple(range(int(cfg.num_hidden_layers)))  # every decoder layer has the sparse MoE block

    def is_mtp_tensor(self, name, cfg=None):
        return name.startswith("mtp.")

    def skip_tensor(self, name, cfg):
        return name.startswith(("mtp.", "model.visual."))

    def router_note(self, cfg):
        return Family.router_note(self, cfg) + "; the shared expert is scaled by its own sigmoid gate"

    def tiny_config_kwargs(self, layers, hidden, experts, top_k, vocab):
        text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=top_k,
                    moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden // 2,
                    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=hidden // 4,
                    linear_value_head_dim=hidden // 4,
                    layer_types=[("full_attention" if i % 2 else "linear_attention") for i in range(layers)],
                    max_position_embeddings=1024, initializer_range=hidden ** -0.5,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      num_position_embeddings=64, patch_size=4)
        return dict(text_config=text, vision_config=vision, tie_word_embeddings=False)

    def tiny_model(self, config):
        from transformers.models.qwen3_5_moe import Qwen3_5MoeForConditionalGeneration

        return Qwen3_5MoeForConditionalGeneration(config)


FAMILY = Qwen35MoeFamily()
