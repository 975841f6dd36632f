"""Run llama.cpp's convert_hf_to_gguf.py --vocab-only on several checkpoint folders in one process:

    python tests/llama_vocab.py CONVERTER.py JOBS.json

JOBS.json: a list of {"model": DIR, "out": FILE, "pre": NAME or null, "args": [more converter options], optional}.
Each job runs the converter unchanged,
except that where it names a byte-level BPE's pre-tokenizer by hashing the tokenization of a probe text
(`TextModel.get_vocab_base_pre`) and the hash is none it knows -- true of every locally trained tokenizer --
the job's "pre" answers (when given; else the converter's own NotImplementedError stands). Prints one JSON list:
per job {"ok": bool, "error": the exception's type and first line when not ok, "pre_by_hash": whether the
converter knew the hash (null when it did not ask)}. A child process: its gguf-py must not meet the installed
gguf package in one interpreter (see tests/llama_convert.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    script, jobs_file = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    sys.path.insert(0, str(script.parent))
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(1, str(script.parent / "gguf-py"))
    import conversion.base

    by_hash = conversion.base.TextModel.get_vocab_base_pre
    state: dict = {}

    def get_vocab_base_pre(self, tokenizer):
        try:
            name = by_hash(self, tokenizer)
            state["pre_by_hash"] = True
            return name
        except NotImplementedError:
            state["pre_by_hash"] = False
            if state["pre"] is None:
                raise
            return state["pre"]

    conversion.base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    results = []
    for job in json.loads(jobs_file.read_text()):
        state.clear()
        state["pre"] = job["pre"]
        sys.argv = [str(script), job["model"], "--vocab-only", "--outtype", "f32", "--outfile", job["out"],
                    *job.get("args", [])]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(str(script), run_name="__main__")
            results.append({"ok": True, "error": None})
        except (Exception, SystemExit) as e:  # the converter's own refusal: a tokenizer it does not recognise
            first = (str(e).strip().splitlines() or [""])[0]
            results.append({"ok": False, "error": f"{type(e).__name__}: {first}"})
        results[-1]["pre_by_hash"] = state.get("pre_by_hash")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
