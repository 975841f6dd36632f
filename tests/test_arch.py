"""Model families: tiny checkpoints round-trip through MoETune's loader and transformers alike."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from engine.model.arch import FAMILIES, ExpertKey, UnsupportedModelError, get_family
from engine.model import CheckpointError, iter_tensors, load_model, make_tiny_model, read_config, tiny_config

from .conftest import FAMILY_NAMES


#: families whose hub checkpoints hold each layer's experts fused: those tensors' names (layer {l})
HUB_FUSED = {
    # gpt-oss: fused, transposed: gate_up_proj [E, H, 2I] (interleaved) and down_proj [E, I, H]
    "gpt_oss": ("model.layers.{l}.mlp.experts.gate_up_proj", "model.layers.{l}.mlp.experts.down_proj"),
    # Granite-MoE: input_linear [E, 2I, H] (gate rows, then up) and output_linear [E, H, I]
    "granitemoe": ("model.layers.{l}.block_sparse_moe.input_linear.weight",
                   "model.layers.{l}.block_sparse_moe.output_linear.weight"),
}
HUB_FUSED["granitemoehybrid"] = HUB_FUSED["granitemoe"]  # Granite-4.0-H: the same block
# Gemma 4: transformers' own gate_up_proj [E, 2I, H] / down_proj [E, H, I], under the multimodal model's language model
HUB_FUSED["gemma4"] = ("model.language_model.layers.{l}.experts.gate_up_proj",
                       "model.language_model.layers.{l}.experts.down_proj")


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_checkpoint_uses_hub_per_expert_names(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    fam = get_family(family)
    raw = [n for n, _ in iter_tensors(path)]
    names = [n for n, _ in fam.convert_stream(iter_tensors(path))]
    keys = [fam.parse_expert_key(n) for n in names]
    experts = [k for k in keys if k is not None]
    # 2 layers x 4 experts x 3 projections, each under its hub name (or from the hub's own fused layout)
    assert len(experts) == 2 * 4 * 3
    assert all(fam.expert_key_name(k) in names for k in experts)
    fused = [n for n in raw if fam.raw_expert_layer(n) is not None]
    if family in HUB_FUSED:
        assert sorted(fused) == sorted(p.format(l=l) for l in (0, 1) for p in HUB_FUSED[family])
    else:
        assert not fused and not any(".experts.gate_up_proj" in n for n in raw)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_expert_views_equal_checkpoint_and_transformers(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    fam = get_family(family)
    ours = load_model(path).model
    ref = _hf_model(path)
    stored = dict(fam.convert_stream(iter_tensors(path)))
    blocks_ours, blocks_ref = dict(fam.moe_blocks(ours)), dict(fam.moe_blocks(ref))
    assert sorted(blocks_ours) == list(fam.facts(ours.config).moe_layers) == sorted(blocks_ref)
    assert len(blocks_ours) == 2  # DeepSeek's tiny checkpoints have a dense first layer before them
    for layer, block in blocks_ours.items():
        for e in range(fam.num_experts(ours.config)):
            views = fam.expert_views(block, e)
            ref_views = fam.expert_views(blocks_ref[layer], e)
            for proj in ("gate", "up", "down"):
                on_disk = stored[fam.expert_key_name(ExpertKey(layer, e, proj))]
                assert torch.equal(views[proj], on_disk)
                assert torch.equal(ref_views[proj], on_disk)
    assert views["gate"].shape == (fam.facts(ours.config).expert_intermediate_size, 64)
    assert views["down"].shape == (64, fam.facts(ours.config).expert_intermediate_size)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_equal_transformers(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    ours = load_model(path).model
    ref = _hf_model(path)
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_routing_is_not_degenerate(family, tiny_checkpoint):
    """Tiny routers spread tokens over several experts (tests of routed code need that)."""
    path = tiny_checkpoint(family)
    lm = load_model(path)
    block = next(lm.family.moe_blocks(lm.model))[1]
    hidden = torch.randn(64, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    _, _, idx = lm.family.router(block)(hidden)
    assert idx.shape == (64, lm.family.facts(lm.config).top_k)
    assert len(torch.unique(idx)) == lm.family.num_experts(lm.config)


def test_sharded_checkpoint_loads(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    ref = _hf_model(src)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path).model
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_facts_follow_qwen_sparse_step():
    fam = get_family("qwen2_moe")
    cfg = tiny_config("qwen2_moe", layers=4)
    cfg.decoder_sparse_step = 2
    cfg.mlp_only_layers = [3]
    assert fam.facts(cfg).moe_layers == (1,)


def test_published_facts_match_design_table():
    sizes = {"olmoe": 3.3, "qwen2_moe": 6.4, "qwen3_moe": 15.0, "mixtral": 23.3}
    for name, gb in sizes.items():
        fam = FAMILIES[name]
        f = fam.facts(fam.published_config())
        assert abs(f.expert_params * 4.13 / 8 / 1e9 - gb) / gb < 0.02
    mixtral = FAMILIES["mixtral"].facts(FAMILIES["mixtral"].published_config())
    assert (mixtral.num_experts, mixtral.top_k, mixtral.norm_topk_prob) == (8, 2, True)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError) as e:
        read_config(tmp_path)
    for name in FAMILIES:
        assert name in str(e.value)
    assert "'llama'" in str(e.value)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(tmp_path)


def test_missing_expert_is_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    src = tiny_checkpoint("olmoe")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.experts.3.up_proj.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 expert projections of model.layers.1.mlp.experts.gate_up_proj"):
        load_model(tmp_path)


def test_wrong_shape_is_refused(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["moe_intermediate_size"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "m")


def test_tiny_model_sizes_and_tokenizer(tmp_path):
    from engine.model import load_tokenizer

    path = make_tiny_model("qwen2_moe", tmp_path, layers=3, hidden=32, experts=6, top_k=3)
    cfg, fam = read_config(path)
    f = fam.facts(cfg)
    assert (f.num_layers, f.hidden_size, f.num_experts, f.top_k) == (3, 32, 6, 3)
    assert f.shared_expert_intermediate_size == 32
    tok = load_tokenizer(path)
    assert len(tok) == cfg.vocab_size
    text = "Below is an instruction. ### Response: the correct answer is true"
    assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="top-k"):
        make_tiny_model("mixtral", tmp_path / "bad", experts=2, top_k=3)
