"""ERNIE-4.5-MoE specifics: the flagship plans resident on 24 GB with DESIGN's expert size; the router's
e_score_correction_bias chooses the experts but not their gates (as transformers computes it); the release's
Multi-Token-Prediction tensors (`model.mtp_*`) are skipped by the loader, the streaming quantiser and every export;
a run of shared gated adapters (beside ungated shared experts, after a dense first layer) trains, resumes exactly,
chats, evaluates, and exports to hf (exact) and GGUF (run in llama.cpp)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.config import from_dict
from engine.model import iter_tensors, load_model
from engine.model.arch import get_family
from engine.model.arch.base import PUBLISHED_DIR

from .tiny_run import check_resume_chat_eval, train_whole_and_resumed
from .tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = "ernie4_5_moe"


def test_flagship_plans_resident_on_24gb_and_moetune_models_lists_it(tmp_path, capsys):
    from engine.cli import main
    from engine.plan import GB, plan

    folder = tmp_path / "ERNIE-4.5-21B-A3B-PT"
    folder.mkdir()
    shutil.copy(PUBLISHED_DIR / "ERNIE-4.5-21B-A3B-PT.json", folder / "config.json")
    p = plan(from_dict({"model": {"path": str(folder)}}), gpu_gb=24)
    # layer 0 is a dense MLP: 27 layers of 64 experts (DESIGN: 10.5 GB in NF4, 389 MB a layer)
    assert sorted(p.placement) == list(range(1, 28)) and set(p.placement.values()) == {"resident"}
    assert abs(p.experts_total_bytes / (10.5 * GB) - 1) < 0.01 and abs(p.expert_layer_bytes / 389e6 - 1) < 0.01
    assert p.fits and p.gpu_total <= 24 * GB and p.host_pinned_bytes == 0
    assert main(["models", "--json"]) == 0
    row = {r["model_type"]: r for r in json.loads(capsys.readouterr().out)}[FAMILY]
    assert (row["moe_layers"], row["experts"], row["top_k"], row["experts_nf4_gb"]) == (27, 64, 6, 10.52)
    assert row["shared_expert_intermediate_size"] == 2 * 1536 and row["gates_renormalised"]
    assert row["gguf_arch"] == "ernie4_5-moe"


def test_correction_bias_chooses_the_experts_not_their_gates(tiny_checkpoint):
    lm = load_model(tiny_checkpoint(FAMILY))
    layer, block = next(lm.family.moe_blocks(lm.model))
    router = lm.family.router(block)
    h = torch.randn(256, lm.config.hidden_size, generator=torch.Generator().manual_seed(4))
    logits, gates, idx = router(h)
    probs = torch.softmax(h @ router.weight.T, dim=-1)
    bias = router.moe_statics.e_score_correction_bias[0]
    chosen = torch.topk(probs + bias, 2, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, chosen.sort(-1).values)
    unbiased = torch.topk(probs, 2, dim=-1).indices
    assert (idx.sort(-1).values != unbiased.sort(-1).values).any(-1).sum() > 10  # the tiny model's bias matters
    want = torch.gather(probs, 1, idx)
    assert_close(gates, want / want.sum(-1, keepdim=True), what="renormalised gates of the unbiased probabilities")
    assert layer == 1 and not hasattr(lm.model.model.layers[0].mlp, "experts")  # the dense first layer


@pytest.fixture(scope="module")
def with_mtp(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a Multi-Token-Prediction layer under the release's names (`model.mtp_*`)."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint(FAMILY)
    dst = tmp_path_factory.mktemp("mtp") / "ckpt"
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    for name, t in list(state.items()):
        if name.startswith("model.layers.2."):  # a decoder layer with experts, as the release's MTP block
            state[name.replace("model.layers.2.", "model.mtp_block.0.")] = torch.randn_like(t)
    h = int(json.loads((src / "config.json").read_text())["hidden_size"])
    state.update({"model.mtp_emb_norm.0.weight": torch.ones(h), "model.mtp_hidden_norm.0.weight": torch.ones(h),
                  "model.mtp_linear_proj.0.weight": torch.randn(h, 2 * h)})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    return src, dst


def test_the_releases_mtp_layer_is_skipped(with_mtp, tmp_path):
    from engine.export import write_gguf
    from engine.model.streaming import quantize_checkpoint_experts

    src, ckpt = with_mtp
    assert any(n.startswith("model.mtp_block.0.mlp.experts.") for n, _ in iter_tensors(ckpt))
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(ckpt).model(ids).logits, load_model(src).model(ids).logits)
    stores = quantize_checkpoint_experts(ckpt, "bf16")  # the MTP block's experts are not taken for layer 2's
    assert sorted(stores) == [1, 2]
    want = dict(iter_tensors(src))["model.layers.2.mlp.experts.0.down_proj.weight"]
    assert torch.equal(stores[2].weights(0, "cpu", torch.float32)[1], want.to(torch.bfloat16).float())
    write_gguf(ckpt, tmp_path / "a.gguf", "f32")
    write_gguf(src, tmp_path / "b.gguf", "f32")
    import gguf
    import numpy as np

    a, b = ({t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / f).tensors} for f in ("a.gguf", "b.gguf"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)


def test_a_shared_gated_run_trains_resumes_chats_evaluates_and_exports(with_mtp, tmp_path, capsys):
    """Shared gated adapters on the MoE blocks (beside the ungated shared experts), attention LoRA, the base
    router's balance loss, NF4 experts, on the checkpoint with the release's MTP layer."""
    from engine.data.synthetic import last_digit_rows
    from engine.export import export_run, llama_child

    _, ckpt = with_mtp
    data = tmp_path / "train.json"
    data.write_text(json.dumps(last_digit_rows(64, seed=1)))
    cfg = {"model": {"path": str(ckpt), "quant": "nf4"},
           "adapter": {"kind": "gated", "rank": 4, "alpha": 8.0, "dropout": 0.1},
           "routing": {"strategy": "shared", "attention_lora": True, "base_balance_loss": 0.01},
           "data": {"train": str(data), "template": "alpaca", "max_len": 128},
           "train": {"max_steps": 6, "lr": 3e-3, "warmup_steps": 1, "micro_batch": 4, "seed": 0, "save_every": 3,
                     "gradient_checkpointing": False}}
    full, parts = train_whole_and_resumed(cfg, tmp_path)

    a = check_resume_chat_eval(full, parts, tmp_path, capsys)
    assert a[6] < a[1]

    # the gates sum to 1: the shared adapter widens every routed expert; the shared experts are zero-padded
    report = export_run(full, "hf", "f32", tmp_path / "hf")
    assert report["exact"] and report["max_abs_logit_diff"] <= 1e-4 * report["check"]["max_abs_logit"]
    merged = dict(iter_tensors(tmp_path / "hf"))
    assert not any(n.startswith("model.mtp_") for n in merged)  # stale after fine-tuning: not exported
    assert merged["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape[0] == 2 * (32 + 4)
    if llama_child.llama_cpp_available():  # the merged GGUF, run in llama.cpp against transformers
        report = export_run(full, "gguf", "f32", tmp_path / "gguf")
        assert report["exact"] and report["llama_cpp"]["max_abs_logit_diff"] <= \
            1e-3 * report["llama_cpp"]["max_abs_logit"]
    fam = get_family(FAMILY)
    assert fam.facts(load_model(tmp_path / "hf").config).expert_intermediate_size == 32 + 4
