"""The tools users run accept our exports: HF PEFT's `PeftModel.from_pretrained` loads `--format peft` with no
missing or unexpected keys and computes the merged `--format hf` export's logits; llama.cpp's own converters
(convert_hf_to_gguf.py on the hf export, convert_lora_to_gguf.py on the peft export) run, and llama.cpp gives
the merged model's logits from the converted merge and from a base GGUF with the converted LoRA; our
`--format gguf-lora` adapter equals the converter's and gives the same logits on our base GGUF. One run per
family (embedded LoRA inside the experts plus attention LoRA, bf16 experts, so every path starts from the same
base). The comparisons fail on a wrong export (the negative checks at the end of two tests).

llama.cpp runs in a child process only (engine/llama_child.py). The converters come from the llama-cpp-python
sdist (scripts/llama_converters.sh, run by bootstrap, puts them in .venv/llama.cpp/; $MOETUNE_LLAMA_CPP_DIR
names another copy); outside CI a machine without them skips those tests, in CI they must be there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.model.arch import get_family
from engine.config import from_dict
from engine.export import ExportError, export_run
from engine.export.peft_lora import FUSED, TENSOR_FILE, apply_peft
from engine.model import load_model
from engine.adapters import attach, save_adapter

from .conftest import FAMILY_NAMES

#: families whose hub checkpoints name each expert: our peft export is per-expert LoRA, which HF PEFT converts onto
#: the fused experts and llama.cpp's convert_lora_to_gguf.py reads; the others' (gpt-oss) is PEFT's fused
#: target_parameters layout, which HF PEFT loads as it is and the converter does not read
PER_EXPERT_PEFT = [f for f in FAMILY_NAMES if get_family(f).peft_per_expert]

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0


def _logit_tolerance(want: np.ndarray) -> float:
    """fp32 paths: what float rounding allows, relative to the logits' scale (measured: ~1e-6 of it)."""
    return 1e-4 * float(np.abs(want).max()) + 1e-5


def assert_logits_equal(got, want, what: str) -> float:
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    diff = float(np.abs(got - want).max())
    assert diff <= _logit_tolerance(want), f"{what}: max |Δlogit| {diff:.3g} > {_logit_tolerance(want):.3g}"
    return diff


def _missing(what: str, fix: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI; {fix}")
    pytest.skip(f"{what} is missing; {fix}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converters() -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py."""
    where = Path(os.environ.get("MOETUNE_LLAMA_CPP_DIR") or ROOT / ".venv" / "llama.cpp")
    if not (where / "convert_lora_to_gguf.py").is_file():
        _missing(f"llama.cpp's converters ({where})", "run scripts/llama_converters.sh (bootstrap does).")
    return where


@pytest.fixture(scope="module")
def llama():
    from engine.export.llama_child import llama_cpp_available, run_llama

    if not llama_cpp_available():
        _missing("llama-cpp-python", "pip install -e '.[dev]'.")
    return run_llama


def convert(converters: Path, *jobs: tuple) -> None:
    """Run llama.cpp's converters, `(script, *args)` each, in one process through tests/llama_convert.py (which
    names the tiny tokenizer's pre-tokenizer as our GGUF writer does: the converter knows hub tokenizers only)."""
    argv = []
    for script, *args in jobs:
        argv += ["--then"] * bool(argv) + [str(converters / script), *map(str, args)]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "llama_convert.py"), "qwen2", *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"llama.cpp's converters failed:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """Factory: family -> folder with `base` (the tiny checkpoint in bf16), `run` (embedded LoRA inside the
    experts + attention LoRA, every tensor random and non-zero), and its `peft`, `hf` (f32) and `gguf-lora`
    (f32) exports; built once per family."""
    from safetensors.torch import load_file, save_file

    cache: dict[tuple, Path] = {}

    def make(family: str, layers: list[int] | None = None, attention: bool = True) -> Path:
        """`layers`: adapt only these layers (of a three-layer model), else all layers of a two-layer one;
        `attention`: attention LoRA too (no gguf-lora export where llama.cpp's graph cannot apply it)."""
        key = (family, tuple(layers or ()), attention)
        if key in cache:
            return cache[key]
        root = tmp_path_factory.mktemp(family)
        base = root / "base"
        shutil.copytree(tiny_checkpoint(family, layers=3) if layers else tiny_checkpoint(family), base)
        state = {n: w.to(torch.bfloat16) for n, w in load_file(str(base / "model.safetensors")).items()}
        save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
        cfg = from_dict({"model": {"path": str(base), "quant": "bf16"},
                         "adapter": {"kind": "lora", "placement": "inside", "rank": RANK, "alpha": ALPHA},
                         "routing": {"strategy": "embedded", "attention_lora": attention, "layers": layers or "all"}})
        peft = attach(load_model(base, expert_quant="bf16"), cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in peft.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        save_adapter(peft, root / "run")
        fam = get_family(family)
        formats = ("peft", "hf") if layers else ("peft", "hf", "gguf-lora")
        if fam.gguf_missing or (attention and fam.gguf_lora_unsupported):  # no GGUF writer; DeepSeek's MLA attention
            formats = tuple(f for f in formats if f != "gguf-lora")
        for fmt in formats:
            export_run(root / "run", fmt, "f32", root / fmt, check_logits=False)
        cache[key] = root
        return root

    return make


def ids_for(root: Path) -> torch.Tensor:
    from engine.model import read_config

    vocab = read_config(root / "base")[0].vocab_size  # a multimodal config's text_config holds it
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def hf_logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float().numpy()


def load_peft(root: Path, folder: Path | None = None):
    """Our peft export loaded as a user loads it; returns the model and the warnings PEFT gave."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(folder or root / "peft"))
    return model.eval(), [str(w.message) for w in caught]


# ---- HF PEFT ----------------------------------------------------------------------------------------------


def _need_peft():
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        _missing("peft", "pip install -e '.[dev]'.")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_peft_loads_our_lora_and_equals_the_merged_export(exported, family):
    """Per-expert LoRA converted by PEFT, or (gpt-oss) PEFT's fused target_parameters layout loaded as it is."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    _need_peft()
    root = exported(family)
    model, caught = load_peft(root)
    # no missing keys (PEFT warns), no key mismatch between config and file (PEFT warns); PEFT's own false alarm
    # about rank/alpha patterns that name parameters, not modules, is expected (see engine/export/peft_lora.py)
    bad = [w for w in caught if "missing" in w.lower() or "unexpected" in w.lower() or "inconsisten" in w.lower()]
    assert not bad, bad
    again = model.load_adapter(str(root / "peft"), adapter_name="again")
    assert again.missing_keys == [] and again.unexpected_keys == []
    model.set_adapter("default")
    # every LoRA PEFT holds came from the file (lora_B starts at zero otherwise; gate_up's is block-diagonal)
    loras = {n: p for n, p in model.named_parameters() if ".lora_B.default" in n}
    fam = get_family(family)
    layers = fam.decoder_layers(model.base_model.model)  # Gemma 4: the multimodal model's language model
    attention = sum(len(fam.attention_modules(getattr(layer, "self_attn", None))) for layer in layers)  # or MLA
    moe = len(fam.facts(model.config).moe_layers)
    assert len(loras) == 2 * moe + attention and all(p.abs().max() > 0 for p in loras.values())
    # LoRA on the fused expert weights only: the expert biases (gpt-oss) are not adapted
    assert {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"} == set(FUSED)

    ids = ids_for(root)
    with torch.no_grad():
        got = model(ids).logits.float().numpy()
    want = hf_logits(root / "hf", ids)
    assert_logits_equal(got, want, f"{family}: PeftModel.from_pretrained vs the merged hf export")
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits.float().numpy()
    assert np.abs(base - want).max() > 100 * _logit_tolerance(want)  # the adapter matters: the check has teeth
    if not fam.peft_per_expert:  # the export's own check applies the fused tensors by hand (apply_peft)
        by_hand = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
        assert apply_peft(by_hand, fam, load_file(str(root / "peft" / TENSOR_FILE)), ALPHA, RANK) == 2 * moe + attention
        with torch.no_grad():
            assert_logits_equal(by_hand(ids).logits.float().numpy(), want, f"{family}: fused PEFT tensors by hand")

    if family == "mixtral":  # negative check: alpha not doubled with gate_up's doubled rank is caught
        wrong = root / "peft-wrong-alpha"
        shutil.copytree(root / "peft", wrong)
        config = json.loads((wrong / "adapter_config.json").read_text())
        config["alpha_pattern"] = {k: ALPHA for k in config["alpha_pattern"]}
        (wrong / "adapter_config.json").write_text(json.dumps(config))
        bad_model, _ = load_peft(root, wrong)
        with torch.no_grad():
            bad_logits = bad_model(ids).logits.float().numpy()
        with pytest.raises(AssertionError, match="max"):
            assert_logits_equal(bad_logits, want, "gate/up LoRA at half scale")
    if family == "gpt_oss":  # negative check: gate_up LoRA rows as gate rows then up rows, not interleaved, is caught
        wrong = root / "peft-wrong-rows"
        shutil.copytree(root / "peft", wrong)
        lora = load_file(str(wrong / TENSOR_FILE))
        for name in [n for n in lora if n.endswith(".experts.base_layer.lora_B.weight")]:
            lora[name] = torch.cat([lora[name][0::2], lora[name][1::2]])
        save_file(lora, str(wrong / TENSOR_FILE))
        bad_model, _ = load_peft(root, wrong)
        with torch.no_grad():
            bad_logits = bad_model(ids).logits.float().numpy()
        with pytest.raises(AssertionError, match="max"):
            assert_logits_equal(bad_logits, want, "gate/up LoRA rows not interleaved")


def test_fused_peft_layout_on_experts_stored_out_by_in(exported, tmp_path, monkeypatch):
    """The fused target_parameters layout on a family whose experts module stores gate_up_proj [E, 2I, H] with gate
    rows then up rows (granitemoe's order; Mixtral's module has it too): PEFT loads it with the merged logits."""
    _need_peft()
    root = exported("mixtral")
    monkeypatch.setattr(type(get_family("mixtral")), "peft_per_expert", False)
    report = export_run(root / "run", "peft", "f32", tmp_path / "peft")  # with the export's own check (by hand)
    assert report["layout"] == "fused" and report["max_abs_logit_diff"] <= _logit_tolerance(
        np.array(report["check"]["max_abs_logit"]))
    model, _ = load_peft(root, tmp_path / "peft")
    ids = ids_for(root)
    with torch.no_grad():
        got = model(ids).logits.float().numpy()
    assert_logits_equal(got, hf_logits(root / "hf", ids), "mixtral, fused PEFT layout vs the merged hf export")


def test_a_run_trained_with_dropout_loads_in_peft(exported, tmp_path):
    """PEFT's target_parameters LoRA refuses lora_dropout != 0 (lora.ParamWrapper): a run trained with adapter
    dropout (which acts in training only) exports lora_dropout 0, and PEFT loads it."""
    _need_peft()
    root = exported("gpt_oss")
    shutil.copytree(root / "run", tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "moetune.json").read_text())
    meta["config"]["adapter"]["dropout"] = 0.1
    (tmp_path / "run" / "moetune.json").write_text(json.dumps(meta))
    export_run(tmp_path / "run", "peft", "f32", tmp_path / "peft", check_logits=False)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    model, _ = load_peft(root, tmp_path / "peft")
    assert {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"} == set(FUSED)


def test_peft_loads_a_run_on_some_layers(exported):
    """routing.layers [1]: the config names layer 1's modules and fused experts, and PEFT adapts only those."""
    _need_peft()
    root = exported("qwen2_moe", layers=[1])
    config = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.layers.1.mlp.experts.gate_up_proj",
                                           "model.layers.1.mlp.experts.down_proj"]
    assert config["target_modules"] == [f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]
    model, caught = load_peft(root)
    assert not [w for w in caught if "missing" in w.lower() or "inconsisten" in w.lower()], caught
    assert {n.split(".")[4] for n, _ in model.named_parameters() if ".lora_" in n} == {"1"}
    ids = ids_for(root)
    with torch.no_grad():
        got = model(ids).logits.float().numpy()
    assert_logits_equal(got, hf_logits(root / "hf", ids), "qwen2_moe, layer 1 only: PEFT vs the merged hf export")


# ---- llama.cpp's converters and our adapter GGUF ---------------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if not get_family(f).gguf_missing])
def test_llama_cpp_converters_and_gguf_lora_give_the_merged_logits(exported, converters, llama, family, monkeypatch):
    import gguf

    from engine.export import gguf_lora, write_gguf
    from engine.export.source import open_run

    if get_family(family).gguf_lora_unsupported:  # DeepSeek: llama.cpp applies no LoRA to MLA's q / kv tensors
        with pytest.raises(ExportError, match="applies no LoRA adapter to the tensors of kv_a_proj_with_mqa"):
            export_run(exported(family) / "run", "gguf-lora", "f32", exported(family) / "refused")
        root = exported(family, attention=False)  # expert LoRA: llama.cpp's graph applies it
    else:
        root = exported(family)
    with_peft = family in PER_EXPERT_PEFT  # gpt-oss: convert_lora_to_gguf.py reads no fused target_parameters LoRA
    # llama.cpp's GLM converter writes GLM's own tokenizer (it looks up [gMASK], <sop>, …), which the tiny model's
    # is not: for glm4_moe only its LoRA converter runs (our GGUF's logits: test_export_gguf.py)
    models = family not in ("glm4_moe", "glm4_moe_lite")
    if family == "granitemoehybrid":  # its converter finds attention layers by the hub's layer_types spelling
        for folder in (root / "hf", root / "base"):
            _hub_layer_types(folder / "config.json")
    # Qwen3.5's converter counts Multi-Token-Prediction layers it must find unless told there are none (our exports,
    # like the tiny checkpoint, have no MTP head)
    mtp = ("--no-mtp",) if family in ("qwen3_5_moe", "qwen3_next") else ()
    convert(converters, *([("convert_hf_to_gguf.py", root / "hf", "--outfile", root / "merged-conv.gguf", "--outtype",
                            "f32", *mtp), ("convert_hf_to_gguf.py", root / "base", "--outfile", root / "base-conv.gguf",
                                           "--outtype", "f32", *mtp)] if models else []),
            *[("convert_lora_to_gguf.py", root / "peft", "--base", root / "base", "--outfile",
               root / "lora-conv.gguf", "--outtype", "f32")] * with_peft)
    write_gguf(root / "base", root / "base.gguf", "f32")  # our GGUF of the base model

    # our adapter GGUF is the converter's, tensor for tensor, with the same adapter metadata
    ours = gguf.GGUFReader(root / "gguf-lora" / "adapter-f32.gguf")
    assert ours.fields["adapter.lora.alpha"].contents() == ALPHA
    if with_peft:
        theirs = gguf.GGUFReader(root / "lora-conv.gguf")
        assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in theirs.tensors)
        mine = {t.name: np.array(t.data) for t in ours.tensors}
        for t in theirs.tensors:
            np.testing.assert_array_equal(mine[t.name], np.array(t.data), err_msg=t.name)
        for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
            assert ours.fields[key].contents() == theirs.fields[key].contents(), key

    ids = ids_for(root)
    want = hf_logits(root / "hf", ids)
    ops = [("logits", row.tolist()) for row in ids]
    runs = {"convert_hf_to_gguf.py's merged GGUF": lambda: llama(root / "merged-conv.gguf", ops),
            "convert_hf_to_gguf.py's base GGUF + our gguf-lora":
                lambda: llama(root / "base-conv.gguf", ops, lora_path=root / "gguf-lora" / "adapter-f32.gguf"),
            "our base GGUF + our gguf-lora": lambda: llama(root / "base.gguf", ops,
                                                           lora_path=root / "gguf-lora" / "adapter-f32.gguf")}
    if with_peft:
        runs["convert_hf_to_gguf.py's base GGUF + convert_lora_to_gguf.py's LoRA"] = \
            lambda: llama(root / "base-conv.gguf", ops, lora_path=root / "lora-conv.gguf")
    if family == "deepseek_v2":
        # llama.cpp reads attention.q_lora_rank as required unless a deepseek2 model has V2-Lite's 26 or 27 layers,
        # and its converter writes none when q_lora_rank is null (V2-Lite's): its GGUFs of this 3-layer model do
        # not load. Ours write 0 (the q_proj path) and run; the converter's LoRA is compared tensor by tensor above.
        assert _field_missing(root / "merged-conv.gguf", "deepseek2.attention.q_lora_rank")
    if family == "deepseek_v2" or not models:
        runs = {what: got for what, got in runs.items() if what.startswith("our")}
    for what, got in runs.items():
        assert_logits_equal(np.stack(got()), want, f"{family}: llama.cpp, {what}, vs the merged hf export")
    base = hf_logits(root / "base", ids)  # the adapter matters (llama.cpp's runs of the base: test_export_gguf.py)
    assert np.abs(base - want).max() > 100 * _logit_tolerance(want)

    if family == "mixtral":  # negative check: q/k LoRA rows left in HF order (llama permutes q/k) is caught
        monkeypatch.setattr(gguf_lora, "_permute_rope", lambda w, n_head: w)
        gguf_lora.write_gguf_lora(open_run(root / "run"), root / "unpermuted.gguf", "f32")
        got = np.stack(llama(root / "base.gguf", ops, lora_path=root / "unpermuted.gguf"))
        with pytest.raises(AssertionError, match="max"):
            assert_logits_equal(got, want, "q/k LoRA unpermuted")


def _hub_layer_types(config_json: Path) -> None:
    """Granite-4.0-H's layer_types as the hub's config.json spells them ("mamba" / "attention"), which llama.cpp's
    converter reads (it takes every other layer for Mamba-2); transformers 5 saves "linear_attention" /
    "full_attention" (the tiny checkpoint's) and reads either."""
    raw = json.loads(config_json.read_text())
    hub = {"linear_attention": "mamba", "full_attention": "attention"}
    raw["layer_types"] = [hub.get(t, t) for t in raw["layer_types"]]
    config_json.write_text(json.dumps(raw, indent=2))


def _field_missing(path: Path, key: str) -> bool:
    import gguf

    return gguf.GGUFReader(path).get_field(key) is None


def test_f16_adapter_on_an_f16_base(exported, llama, tmp_path):
    """f16 tensors: llama.cpp with our f16 adapter on an f16 base GGUF is as close to the fp32 merge as the f16
    merged GGUF is (both round the weights to f16's 11 bits), and the report's check reads the file back."""
    from engine.export import write_gguf

    def median_rel(got, want) -> float:
        """Median over positions of the largest logit difference, relative to the logits' scale: f16 rounding
        moves logits by ~0.1 % of it (measured), but a position whose top-k experts flip under the rounding
        moves by far more, so the maximum is no bound (as in test_export_merge.py)."""
        return float(np.median(np.abs(np.asarray(got) - want).max(-1)) / np.abs(want).max())

    root = exported("qwen3_moe")
    report = export_run(root / "run", "gguf-lora", "f16", tmp_path / "lora16", check_logits=True)
    assert report["files"] == ["adapter-f16.gguf"] and report["gguf_lora"]["dtype"] == "f16"
    assert 0 < report["check"]["median_abs_logit_diff"] < 5e-3 * report["check"]["max_abs_logit"]
    write_gguf(root / "base", tmp_path / "base16.gguf", "f16")
    write_gguf(root / "hf", tmp_path / "merged16.gguf", "f16")
    ids = ids_for(root)
    ops = [("logits", row.tolist()) for row in ids]
    want = hf_logits(root / "hf", ids)
    lora = np.stack(llama(tmp_path / "base16.gguf", ops, lora_path=tmp_path / "lora16" / "adapter-f16.gguf"))
    merged = np.stack(llama(tmp_path / "merged16.gguf", ops))
    assert 0 < median_rel(lora, want) < 5e-3
    assert 0 < median_rel(merged, want) < 5e-3
    base = np.stack(llama(tmp_path / "base16.gguf", ops))
    assert median_rel(base, want) > 10 * 5e-3  # the adapter moves logits far beyond f16's rounding


# ---- refusals, the command line ----------------------------------------------------------------------------

#: (family, config edits, strategy, kind, placement, phrases the gguf-lora refusal must hold)
REFUSED = [
    ("olmoe", {}, "embedded", "lora", "parallel", ["'embedded'", "parallel lora", "No export format"]),
    ("mixtral", {}, "embedded", "gated", "parallel", ["'embedded'", "gated", "Formats that work for this run: hf, gguf."]),
    ("mixtral", {}, "routed", "lora", "parallel", ["'routed'", "of its own", "No export format"]),
    ("qwen3_moe", {"norm_topk_prob": False}, "embedded", "lora", "inside",
     ["llama.cpp", "norm_topk_prob=False", "Formats that work for this run: hf, peft."]),
]


@pytest.mark.parametrize("family, edits, strategy, kind, placement, phrases", REFUSED,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4]}" for c in REFUSED])
def test_runs_without_a_lora_form_are_refused(tiny_checkpoint, tmp_path, family, edits, strategy, kind, placement,
                                              phrases):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint(family), base)
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**raw, **edits}))
    cfg = from_dict({"model": {"path": str(base), "quant": "bf16"},
                     "adapter": {"kind": kind, "placement": placement, "rank": RANK, "alpha": ALPHA},
                     "routing": {"strategy": strategy, "num_adapters": 3}})
    save_adapter(attach(load_model(base, expert_quant="bf16"), cfg), tmp_path / "run")
    with pytest.raises(ExportError) as err:
        export_run(tmp_path / "run", "gguf-lora", "f16", tmp_path / "out")
    message = str(err.value)
    assert "as gguf-lora" in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    assert not (tmp_path / "out").exists()


def test_cli_exports_gguf_lora(exported, tmp_path, capsys):
    from engine.cli import main

    root = exported("olmoe")
    assert main(["export", "--run", str(root / "run"), "--format", "gguf-lora", "--dtype", "bf16",
                 "--out", str(tmp_path / "out"), "--no-check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "gguf-lora" and report["files"] == ["adapter-bf16.gguf"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter-bf16.gguf", "export_report.json"]
    with pytest.raises(ExportError, match=r"--dtype\) 'q8_0' is not allowed for --format gguf-lora"):
        export_run(root / "run", "gguf-lora", "q8_0", tmp_path / "q8")


def test_export_tab_shows_the_command_that_runs_the_export(exported, tmp_path):
    """After an export the app shows how to run the file: llama-cli with --lora, PeftModel.from_pretrained."""
    from app.export_tab import result_html

    root = exported("olmoe")
    shown = {}
    for fmt in ("peft", "gguf-lora", "hf"):
        text = (root / fmt / "export_report.json").read_text()
        shown[fmt] = result_html(root / fmt, text)
        assert "Wrote" in shown[fmt] and "exact&quot;: true" in shown[fmt]
    lora = root / "gguf-lora" / "adapter-f32.gguf"
    base_gguf = root / "run" / "export-gguf-base" / "base-f16.gguf"  # the base model by MoETune's own GGUF writer
    assert f"llama-cli -m {base_gguf} --lora {lora}" in shown["gguf-lora"]
    assert (f"moetune export --run {root / 'run'} --format gguf --base --dtype f16 --out {base_gguf.parent}"
            in shown["gguf-lora"])
    assert (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(root / 'base')!r}), "
            f"{str(root / 'peft')!r})").replace("'", "&#x27;") in shown["peft"]
    assert f"convert_lora_to_gguf.py {root / 'peft'} --base {root / 'base'}" in shown["peft"]
    assert "AutoModelForCausalLM.from_pretrained" in shown["hf"]
    fused = exported("gpt_oss")  # PEFT's fused layout, which llama.cpp's converter does not read: the gguf-lora export
    shown = result_html(fused / "peft", (fused / "peft" / "export_report.json").read_text())
    assert f"convert_lora_to_gguf.py {fused / 'peft'}" not in shown
    assert (f"moetune export --run {fused / 'run'} --format gguf-lora --dtype f32 --out "
            f"{fused / 'run' / 'export-gguf-lora-f32'}") in shown
