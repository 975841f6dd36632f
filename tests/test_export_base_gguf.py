"""`moetune export --format gguf --base`: a run's base model alone as GGUF, through MoETune's own writer (llama.cpp's
convert_hf_to_gguf.py refuses BPE pre-tokenizers it does not know), in the same tensor types as the merged GGUF;
llama.cpp running it with the run's `--format gguf-lora` adapter gives the merged GGUF's logits. The Export tab
shows the command that writes it beside the adapter, and that command works."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.cli import main
from engine.export import export_run

from .tiny_run import bf16_copy, train_tiny_run
from .tolerance import assert_logits_close

#: mixtral runs as llama.cpp's llama (q/k rows permuted, in the base and in the LoRA); qwen3_moe with q/k norms;
#: lfm2_moe with short-conv layers beside attention (LoRA on q/k/v/out_proj); qwen3_5_moe with Gated DeltaNet layers
#: beside gated attention (LoRA on the full-attention layers' q/k/v/o_proj, q_proj giving the output gate too)
FAMILIES = ["mixtral", "qwen3_moe", "lfm2_moe", "qwen3_5_moe"]
PROMPTS = [[1, 40, 41, 300, 12, 77, 5, 9], [5, 100, 200, 300, 400], [1, 7, 8]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    from engine.export import llama_child

    if not llama_child.llama_cpp_available():
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is missing in CI; pip install -e '.[dev]'.")
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    return llama_child.run_llama


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """Factory: family -> a tiny trained run on a bf16-stored base (built once per family)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            cache[family] = train_tiny_run(bf16_copy(tiny_checkpoint(family), root / "base"), root)
        return cache[family]

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_base_gguf_with_the_gguf_lora_equals_the_merged_gguf(trained, llama, tmp_path, family):
    run = trained(family)
    report = export_run(run, "gguf", "f32", tmp_path / "base", check_logits=True, base=True)
    assert report["base_only"] and report["files"] == ["base-f32.gguf"] and report["merged"] == []
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["base-f32.gguf", "export_report.json"]
    cpp = report["llama_cpp"]  # the export's own check: llama.cpp on the base GGUF against transformers
    assert report["max_abs_logit_diff"] == cpp["max_abs_logit_diff"]
    assert cpp["median_abs_logit_diff"] <= 1e-4 * cpp["max_abs_logit"]
    export_run(run, "gguf-lora", "f32", tmp_path / "lora", check_logits=False)
    export_run(run, "gguf", "f32", tmp_path / "merged", check_logits=False)

    ops = [("logits", p) for p in PROMPTS]
    base_gguf = tmp_path / "base" / "base-f32.gguf"
    merged = llama(tmp_path / "merged" / "model-f32.gguf", ops)
    paired = llama(base_gguf, ops, lora_path=tmp_path / "lora" / "adapter-f32.gguf")
    alone = llama(base_gguf, ops)
    for prompt, got, want, plain in zip(PROMPTS, paired, merged, alone):
        assert_logits_close(got, want, what=f"{family} {prompt}: base GGUF + gguf-lora vs the merged GGUF")
        with pytest.raises(AssertionError):  # the adapter matters: the comparison has teeth
            assert_logits_close(plain, want, what="the base GGUF alone")


def test_cli_writes_the_base_in_the_merged_exports_tensor_types(trained, tmp_path, capsys):
    run = trained("qwen3_moe")
    reports = {}
    for flags, out in ((["--base"], tmp_path / "base"), ([], tmp_path / "merged")):
        assert main(["export", "--run", str(run), "--format", "gguf", "--dtype", "q8_0", "--out", str(out),
                     "--no-check", *flags]) == 0
        reports[out.name] = json.loads(capsys.readouterr().out)
    assert reports["base"]["base_only"] is True and "base_only" not in reports["merged"]
    assert reports["base"]["gguf"]["tensor_types"] == reports["merged"]["gguf"]["tensor_types"]
    base = gguf.GGUFReader(tmp_path / "base" / "base-q8_0.gguf")
    merged = gguf.GGUFReader(tmp_path / "merged" / "model-q8_0.gguf")
    layout = lambda r: {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in r.tensors}  # noqa: E731
    assert layout(base) == layout(merged) and "Q8_0" in {t for _, t in layout(base).values()}
    assert base.fields["general.type"].contents() == "model"
    # the base holds the checkpoint's own weights, not the merge: the adapted tensors differ
    b, m = ({t.name: np.array(t.data) for t in r.tensors} for r in (base, merged))
    assert not np.array_equal(b["blk.0.attn_q.weight"], m["blk.0.attn_q.weight"])
    assert np.array_equal(b["blk.0.ffn_gate_inp.weight"], m["blk.0.ffn_gate_inp.weight"])


def test_base_is_for_gguf_only(trained, tmp_path, capsys):
    run = trained("qwen3_moe")
    assert main(["export", "--run", str(run), "--format", "gguf-lora", "--base", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--base writes the base model alone as GGUF: use it with --format gguf" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_export_tab_shows_the_base_gguf_beside_the_adapter_and_its_command_works(trained, tmp_path, capsys):
    from app.export_tab import result_html

    run = trained("qwen3_moe")
    lora_dir = run / "export-gguf-lora"
    assert main(["export", "--run", str(run), "--format", "gguf-lora", "--out", str(lora_dir), "--no-check"]) == 0
    capsys.readouterr()
    shown = result_html(lora_dir, (lora_dir / "export_report.json").read_text())
    base_dir, base_file = run / "export-gguf-base", run / "export-gguf-base" / "base-f16.gguf"
    command = f"moetune export --run {run} --format gguf --base --dtype f16 --out {base_dir}"
    assert command in shown
    assert f"llama-cli -m {base_file} --lora {lora_dir / 'adapter-f16.gguf'}" in shown
    assert "convert_hf_to_gguf" not in shown
    argv = shlex.split(command)
    assert argv[0] == "moetune" and main(argv[1:] + ["--no-check"]) == 0  # the shown command writes that file
    assert base_file.is_file()
    report_text = (base_dir / "export_report.json").read_text()
    back = result_html(base_dir, report_text)  # and the base's page points back at the adapter
    assert f"llama-cli -m {base_file} --lora {lora_dir / 'adapter-f16.gguf'}" in back
    assert f"moetune export --run {run} --format gguf-lora --dtype f16 --out {lora_dir}" in back


def test_export_tabs_base_button_writes_the_base_gguf(trained):
    """The button beside Export runs `moetune export --format gguf --base` (a real child command) into
    RUN/export-gguf-base and shows how to load the run's adapter onto it."""
    import gradio as gr

    from app import export_tab
    from app.runner import Runner

    run = trained("qwen3_moe")
    with gr.Blocks() as blocks:
        export_tab.build(Runner(run.parent))
    [export_base] = [b.fn for b in blocks.fns.values() if getattr(b.fn, "__name__", "") == "export_base"]
    shown = export_base(run.name, "bf16", "")
    base_file = run / "export-gguf-base" / "base-bf16.gguf"
    assert f"Wrote {run / 'export-gguf-base'}" in shown and base_file.is_file(), shown
    assert f"llama-cli -m {base_file} --lora {run / 'export-gguf-lora' / 'adapter-bf16.gguf'}" in shown
    report = json.loads((run / "export-gguf-base" / "export_report.json").read_text())
    assert report["base_only"] is True and report["gguf"]["dtype"] == "bf16"
