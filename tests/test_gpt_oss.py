"""gpt-oss specifics: the hub's MXFP4 experts (`*_blocks` + `*_scales`, written here in the hub's layout from a
tiny model) load through the streaming quantiser to the values transformers' own loader gives; the clamped
SwiGLU with expert biases equals transformers' experts where the clamp bites; a run on the MXFP4 checkpoint
trains, resumes exactly, chats and exports (hf reloads with the run's logits); GGUF's YaRN caveat is said."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from engine.config import from_dict
from engine.model import load_model
from engine.model.hf_checkpoint import iter_tensors

from .tiny_run import check_resume_chat_eval, train_whole_and_resumed
from .tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

#: the FP4 (e2m1) values of codes 0..15, as the MXFP4 format defines them (OCP Microscaling spec)
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., out, in] as MXFP4 in the hub's layout: blocks [..., out, in/32, 16] uint8 (two codes a byte, the
    even element in the low nibble), scales [..., out, in/32] uint8 (exponent + 127); and the values it encodes."""
    *lead, out, inner = w.shape
    x = w.float().reshape(*lead, out, inner // 32, 32)
    exp = torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -120) / 6.0))
    scaled = x / torch.exp2(exp)
    codes = (scaled.unsqueeze(-1) - FP4).abs().argmin(-1)  # nearest FP4 value (ties: the lower code)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    decoded = (FP4[codes] * torch.exp2(exp)).reshape(w.shape)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8), decoded


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny gpt-oss with its experts in the hub's MXFP4 layout and quantization_config, plus the same model
    with the experts' decoded values in bf16 (what the MXFP4 file holds) as `decoded`."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("mxfp4")
    src = tiny_checkpoint("gpt_oss")
    hub, decoded = root / "hub", root / "decoded"
    shutil.copytree(src, hub)
    shutil.copytree(src, decoded)
    state = load_file(str(src / "model.safetensors"))
    packed, plain = {}, {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, values = mxfp4(t.transpose(1, 2))  # the hub stores [E, out, in]
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            plain[name] = values.transpose(1, 2).to(torch.bfloat16).contiguous()
        else:
            packed[name] = plain[name] = t.to(torch.bfloat16)
    save_file(packed, str(hub / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(decoded / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((hub / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (hub / "config.json").write_text(json.dumps(cfg))
    return {"hub": hub, "decoded": decoded}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_mxfp4_experts_stream_to_the_values_transformers_loads(mxfp4_checkpoint):
    from transformers import AutoModelForCausalLM

    from engine.model.arch import get_family
    from engine.model.streaming import quantize_checkpoint_experts

    hub, decoded = mxfp4_checkpoint["hub"], mxfp4_checkpoint["decoded"]
    names = [n for n, _ in iter_tensors(hub)]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names and not any(n.endswith("_proj") for n in names)
    fam = get_family("gpt_oss")
    # the streamed bf16 stores hold exactly the decoded values, de-interleaved into gate then up rows
    stores = quantize_checkpoint_experts(hub, "bf16")
    ref = dict(fam.convert_stream(iter_tensors(decoded)))
    for layer, store in stores.items():
        for e in range(store.num_experts):
            gate_up, down = store.weights(e, "cpu", torch.float32)
            key = f"model.layers.{layer}.mlp.experts.{e}.%s.weight"
            assert torch.equal(gate_up, torch.cat([ref[key % "gate_proj"], ref[key % "up_proj"]]).float())
            assert torch.equal(down, ref[key % "down_proj"].float())
    # the whole model: ours from the MXFP4 file equals transformers' own load of it (its MXFP4 dequantiser on CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(str(hub), dtype=torch.float32).eval()
    theirs.config._experts_implementation = "eager"
    ours = load_model(hub).model
    with torch.no_grad():
        want, got = theirs(_ids()).logits, ours(_ids()).logits
    assert_close(got, want, what="logits from the MXFP4 checkpoint")
    with torch.no_grad():
        assert torch.equal(got, load_model(decoded).model(_ids()).logits)


def test_clamped_swiglu_with_biases_equals_transformers_where_the_clamp_bites(tiny_checkpoint):
    from engine.adapters import attach

    lm = load_model(tiny_checkpoint("gpt_oss"))
    block = dict(lm.family.moe_blocks(lm.model))[0]
    reference = block.experts  # transformers' GptOssExperts
    reference.config = lm.config
    h = torch.randn(40, lm.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    _, gates, idx = lm.family.router(block)(h)
    with torch.no_grad():
        gate_up = torch.einsum("th,ehi->tei", h, reference.gate_up_proj)
        assert (gate_up[..., 0::2] > lm.config.swiglu_limit).any() and (gate_up[..., 1::2] < -lm.config.swiglu_limit).any()
        assert reference.gate_up_proj_bias.abs().min() > 0 and reference.down_proj_bias.abs().min() > 0
        lm.model.config._experts_implementation = "eager"
        want = reference(h, idx, gates)
        attach(lm, from_dict({"model": {"quant": "bf16"}, "routing": {"strategy": "embedded"}}))
        got = block.experts(h, idx, gates)
    assert_close(got, want, what="expert bank vs GptOssExperts")
    assert want.abs().max() > 1


def test_a_run_on_the_mxfp4_checkpoint_trains_resumes_chats_and_exports(mxfp4_checkpoint, tmp_path, capsys):
    from engine.data.synthetic import last_digit_rows
    from engine.export import export_run

    from .test_export_merge import reload

    data = tmp_path / "train.json"
    data.write_text(json.dumps(last_digit_rows(64, seed=1)))
    cfg = {"model": {"path": str(mxfp4_checkpoint["hub"]), "quant": "nf4"},
           "adapter": {"kind": "lora", "placement": "inside", "rank": 4, "alpha": 8.0},
           "routing": {"strategy": "embedded", "attention_lora": True},
           "data": {"train": str(data), "template": "alpaca", "max_len": 128},
           "train": {"max_steps": 6, "lr": 3e-3, "warmup_steps": 1, "micro_batch": 4, "seed": 0, "save_every": 3,
                     "gradient_checkpointing": False}}
    full, parts = train_whole_and_resumed(cfg, tmp_path)

    check_resume_chat_eval(full, parts, tmp_path, capsys)
    # hf: the hub's fused bf16 layout, no quantization_config, reloads in transformers with the run's logits
    report = export_run(full, "hf", "f32", tmp_path / "hf")
    assert report["exact"] and report["max_abs_logit_diff"] <= 1e-3 * report["check"]["max_abs_logit"]
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(iter_tensors(tmp_path / "hf"))
    with torch.no_grad():
        assert reload(tmp_path / "hf")(_ids()).logits.isfinite().all()


def test_gguf_of_the_release_rope_warns_of_llama_cpp_truncating_yarn(tiny_checkpoint, tmp_path):
    from engine.export import write_gguf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("gpt_oss"), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"]["truncate"] = False  # as gpt-oss-20b / 120b publish it
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="truncate=false"):
        write_gguf(ckpt, tmp_path / "model.gguf", "f16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny model's truncate=true and its sliding window: no warning
        write_gguf(tiny_checkpoint("gpt_oss"), tmp_path / "plain.gguf", "f16")
