"""GGUF tokenizer metadata: for every family's tiny checkpoint, with either tokenizer kind (`bpe`: byte-level, Qwen2
style; `spm`: SentencePiece-style BPE with byte fallback, Llama style), our GGUF holds exactly the `tokenizer.*`
keys and values llama.cpp's own convert_hf_to_gguf.py writes for the same folder, wherever that converter
recognises the tokenizer. One deliberate difference: for `spm` the converter's tokenizer.json reader (the gguf
package's LlamaHfVocab) writes the placeholder score -1000 for every token, with which llama.cpp's
highest-score-first joining tokenises some text unlike transformers; ours are the BPE merge ranks, and llama.cpp
then tokenises as transformers does (checked here on the texts where it matters).

What the converter does not recognise, and so is not compared: a byte-level BPE's pre-tokenizer whose hash is
none of the hub tokenizers it lists (every locally trained one: the runner, tests/llama_vocab.py, answers with
the name our writer picks, and llama.cpp's tokenisation with it is checked in test_export_gguf.py); tokenizer.json
with byte fallback where the family's converter class reads only byte-level BPE (OLMoE, Qwen, gpt-oss, LFM2) or only a
SentencePiece tokenizer.model (ERNIE-4.5, which also refuses the `bpe` kind: the hub's release ships one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from engine.export import ExportError, write_gguf
from engine.model import make_tiny_model
from engine.model.tiny import TOKENIZERS

from .conftest import FAMILY_NAMES
from .test_export_ecosystem import ROOT, converters  # noqa: F401  (the converters fixture)
from .test_export_gguf import SCORE_TEXTS, TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")

#: (family, tokenizer kind) the converter does not recognise, and the error it stops with
UNRECOGNISED = {
    **{(f, "spm"): "NotImplementedError: BPE pre-tokenizer was not recognized"
       for f in ("olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe",
                 "glm4_moe_lite", "lfm2_moe", "qwen3_next",
                 "granitemoehybrid")},  # Granite-4.0-H's converter class (Mamba-2's) reads tokenizer.json
    # as byte-level BPE only
    # GLM's converter class reads GLM's own special tokens ([gMASK], <sop>...), which a tiny tokenizer lacks
    **{(f, "bpe"): "KeyError: '[gMASK]'" for f in ("glm4_moe", "glm4_moe_lite")},
    **{("ernie4_5_moe", kind): "FileNotFoundError: File not found:" for kind in TOKENIZERS},
}
#: (family, tokenizer kind) our writer refuses, and why: transformers loads a Qwen3.5 checkpoint's tokenizer as its
#: own Qwen3_5Tokenizer, which runs NFC and Qwen3.5's byte-level pipeline on any vocabulary (the converter hashes
#: that pipeline too); llama.cpp's SentencePiece tokenizer has no NFC
REFUSED = {("qwen3_5_moe", "spm"): 'normalizer step {"type": "NFC"} has no llama.cpp equivalent',
           # Gemma 4: no GGUF writer yet (Family.gguf_missing), so no tokenizer of ours to compare
           **{("gemma4", kind): "MoETune's GGUF writer does not write Gemma 4 yet" for kind in TOKENIZERS}}
#: converter options a family's folder needs: Qwen3.5's and Qwen3-Next's converters expect Multi-Token-Prediction
#: layers unless told there are none (the tiny checkpoint, like MoETune's exports, has no MTP head)
CONVERTER_ARGS = {"qwen3_5_moe": ["--no-mtp"], "qwen3_next": ["--no-mtp"]}


def _tokenizer_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def compared(converters, tmp_path_factory):  # noqa: F811
    """(family, kind) -> {"ours": GGUF, "theirs": the converter's vocab-only GGUF or None, "result": its outcome}."""
    root = tmp_path_factory.mktemp("tokenizers")
    cases, jobs = {}, []
    for family in FAMILY_NAMES:
        for kind in TOKENIZERS:
            folder = make_tiny_model(family, root / f"{family}-{kind}", layers=1, hidden=32, tokenizer=kind)
            ours = root / f"{family}-{kind}.gguf"
            try:
                write_gguf(folder, ours, "f32")
            except ExportError as e:  # a tokenizer our GGUF writer refuses (REFUSED): nothing to compare
                cases[(family, kind)] = {"refused": str(e)}
                continue
            pre = _tokenizer_fields(ours)["tokenizer.ggml.pre"] if kind == "bpe" else None
            cases[(family, kind)] = {"folder": folder, "ours": ours, "theirs": root / f"{family}-{kind}.conv.gguf"}
            jobs.append({"model": str(folder), "out": str(cases[(family, kind)]["theirs"]), "pre": pre,
                         "args": CONVERTER_ARGS.get(family, [])})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "llama_vocab.py"),
                           str(converters / "convert_hf_to_gguf.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, result in zip([c for c in cases.values() if "refused" not in c],
                            json.loads(proc.stdout.strip().splitlines()[-1])):
        case["result"] = result
    return cases


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tokenizer_metadata_equals_llama_cpp_converter(compared, family, kind):
    case = compared[(family, kind)]
    assert ("refused" in case) == ((family, kind) in REFUSED), case.get("refused")
    if "refused" in case:  # the export names what llama.cpp lacks; there is no file of ours to compare
        assert REFUSED[(family, kind)] in case["refused"], case["refused"]
        return
    result = case["result"]
    if (family, kind) in UNRECOGNISED:
        assert not result["ok"] and result["error"].startswith(UNRECOGNISED[(family, kind)]), result
        return
    assert result["ok"], result
    # byte-level BPE: named by hash, which no locally trained tokenizer has (the runner answers with our name)
    assert result["pre_by_hash"] is (False if kind == "bpe" else None)
    ours, theirs = _tokenizer_fields(case["ours"]), _tokenizer_fields(case["theirs"])
    assert sorted(ours) == sorted(theirs)
    assert len(ours["tokenizer.ggml.tokens"]) == 512 and ours["tokenizer.ggml.bos_token_id"] == 1
    model = ours["tokenizer.ggml.model"]
    for key in ours:
        if key == "tokenizer.ggml.scores":  # the converter's placeholder, ours the merge ranks (module docstring)
            assert model == "llama" and set(theirs[key]) == {-1000.0} and len(set(ours[key])) > 200
            continue
        assert ours[key] == theirs[key], key
    assert (model, "tokenizer.ggml.merges" in ours) == (("gpt2", True) if kind == "bpe" else ("llama", False))


def test_our_spm_scores_tokenise_as_transformers_where_the_converters_do_not(compared):
    from transformers import AutoTokenizer

    from engine.export import llama_child

    if not llama_child.llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    case = compared[("mixtral", "spm")]
    hf = AutoTokenizer.from_pretrained(str(case["folder"]))
    texts = TEXTS + SCORE_TEXTS
    want = [hf.encode(text, add_special_tokens=False) for text in texts]
    ops = [("tokenize", text, False) for text in texts]
    ours = llama_child.run_llama(case["ours"], ops, vocab_only=True)
    theirs = llama_child.run_llama(case["theirs"], ops, vocab_only=True)
    assert ours == want
    assert [t for t, w, o in zip(texts, want, theirs) if o != w] == SCORE_TEXTS


def test_a_sentencepiece_tokenizer_that_prepends_no_space_says_so(compared, tmp_path):
    """Where the tokenizer puts no '▁' before the text (Metaspace, prepend_scheme never), the file says
    add_space_prefix false (llama.cpp prepends one by default) and llama.cpp tokenises as transformers does."""
    import shutil

    from transformers import AutoTokenizer

    from engine.export import llama_child

    folder = shutil.copytree(compared[("mixtral", "spm")]["folder"], tmp_path / "ckpt")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    write_gguf(folder, tmp_path / "model.gguf", "f32")
    assert _tokenizer_fields(tmp_path / "model.gguf")["tokenizer.ggml.add_space_prefix"] is False
    if not llama_child.llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    hf = AutoTokenizer.from_pretrained(str(folder))
    texts = ["Hello world", "The quick brown fox jumps over 3 lazy dogs."]
    got = llama_child.run_llama(tmp_path / "model.gguf", [("tokenize", t, True) for t in texts], vocab_only=True)
    assert got == [hf(t)["input_ids"] for t in texts]
    assert hf.convert_ids_to_tokens(got[0])[1][0] != "\u2581"  # no space before the first word
