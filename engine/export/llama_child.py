"""llama.cpp (llama-cpp-python) in a child process, so that a native crash is a reported error, never the
death of the caller (a test suite, an export, the app).

`run_llama(model_path, ops)` starts this file as a script in a fresh interpreter (it imports only
llama_cpp and numpy: no torch, no engine), opens the GGUF once and runs the ops in order:

    ("logits", ids)             -> float32 [len(ids), V]: the logits after every position (teacher-forced)
    ("greedy", prompt, n)       -> (n new token ids, float32 [n, V] logits that chose them)
    ("tokenize", text, add_bos) -> token ids (special tokens parsed)
    ("detokenize", ids)         -> text (llama-cpp-python's detokenize, special tokens rendered)
    ("detokenize_raw", ids)     -> text (llama.cpp's llama_detokenize, which drops the prefix space it adds)
    ("raise_signal", name)      -> the child kills itself with that signal (tests of the crash path)

A child killed by a signal raises `LlamaCppCrash` naming the signal; a Python error in the child raises
`LlamaCppError` with its traceback.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


class LlamaCppError(RuntimeError):
    """llama.cpp could not run the file (a Python-level error in the child)."""


class LlamaCppCrash(LlamaCppError):
    """The llama.cpp child process died from a signal (a native crash: SIGSEGV, SIGILL, SIGABRT...)."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def run_llama(model_path: str | Path, ops: list[tuple], *, lora_path: str | Path | None = None,
              vocab_only: bool = False, n_ctx: int = 64, f32_cache: bool = True, repack: bool = True,
              timeout: float = 600, env: dict[str, str] | None = None) -> list[Any]:
    """Open `model_path` with llama.cpp in a child process and run `ops` (see the module doc); their results.

    `f32_cache` keeps the KV cache in f32, so an f32 file computes in f32 throughout (llama.cpp's default
    cache is f16). `repack=False` is llama-cli's `--no-repack`: no extra CPU buffer types (AMX, repacked
    weights), see `known_crash`. `env` adds variables to the child's environment."""
    request = {"model_path": str(model_path), "lora_path": str(lora_path) if lora_path else None,
               "vocab_only": vocab_only, "n_ctx": n_ctx, "f32_cache": f32_cache, "repack": repack, "ops": ops}
    with tempfile.TemporaryDirectory(prefix="moetune-llama-") as tmp:
        req, res = Path(tmp) / "request.pkl", Path(tmp) / "result.pkl"
        req.write_bytes(pickle.dumps(request))
        child_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, str(req), str(res)],
                                  capture_output=True, text=True, timeout=timeout, env=child_env)
        except subprocess.TimeoutExpired as e:
            raise LlamaCppError(f"llama.cpp did not finish {model_path} within {timeout:.0f} s") from e
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        if proc.returncode < 0:
            name = _signal_name(-proc.returncode)
            raise LlamaCppCrash(f"llama.cpp (llama-cpp-python {llama_cpp_version()}) crashed with {name} "
                                f"running {model_path}:\n{tail}", name)
        if proc.returncode != 0 or not res.is_file():
            raise LlamaCppError(f"llama.cpp failed on {model_path} (exit {proc.returncode}):\n{tail}")
        return pickle.loads(res.read_bytes())


#: GGUF types that llama.cpp's CPU backend multiplies with its AMX kernels (ggml-cpu/amx/common.h,
#: qtype_has_amx_kernels), when it was built for a CPU with AMX-INT8 (GGML_NATIVE on such a CPU)
AMX_TYPES = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_xs")

AMX_CRASH = (
    "llama.cpp's CPU backend crashes (SIGSEGV in ggml_backend_amx_mul_mat) running {dtype} files on CPUs with "
    "AMX (Intel Xeon Sapphire Rapids and newer: amx_int8 in /proc/cpuinfo) when it is built for them, as "
    "llama-cpp-python {version} builds itself by default (GGML_NATIVE); llama.cpp's own convert_hf_to_gguf.py "
    "writes byte-identical tensors that crash the same way, so the file is sound. It runs with weight "
    "repacking off (llama-cli / llama-server --no-repack), with a llama.cpp built without AMX "
    "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON ...\", as scripts/bootstrap.sh does), on other CPUs, "
    "or export --dtype f16 / bf16 instead.")


def cpu_has_amx() -> bool:
    """Whether this CPU reports AMX-INT8 (Linux /proc/cpuinfo)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def amx_risk(dtype: str) -> str | None:
    """AMX_CRASH for a `dtype` file on this CPU when llama.cpp built for it may crash running the file, else None."""
    if dtype.lower() in AMX_TYPES and cpu_has_amx():
        return AMX_CRASH.format(dtype=dtype, version=llama_cpp_version() or "(not installed)")
    return None


def known_crash(crash: LlamaCppCrash, dtype: str) -> str | None:
    """The documented llama.cpp bug behind `crash` on a `dtype` file (see AMX_CRASH), or None if it is not one."""
    return amx_risk(dtype) if crash.signal_name == "SIGSEGV" else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---- the child ---------------------------------------------------------------------------------------------


def _child(request: dict) -> list[Any]:
    import ctypes

    import llama_cpp
    import llama_cpp.llama
    import numpy as np

    if not request["repack"]:  # llama-cli's --no-repack; llama-cpp-python's Llama() does not expose it
        defaults = llama_cpp.llama_model_default_params

        def no_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = no_extra_buffers

    kwargs: dict[str, Any] = {"model_path": request["model_path"], "verbose": False}
    if request["vocab_only"]:
        kwargs["vocab_only"] = True
    else:
        kwargs.update(n_ctx=request["n_ctx"], n_batch=request["n_ctx"], n_threads=1, logits_all=True)
        if request["lora_path"]:
            kwargs["lora_path"] = request["lora_path"]
        if request["f32_cache"]:
            kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(**kwargs)
    results: list[Any] = []
    for op, *args in request["ops"]:
        if op == "raise_signal":
            signal.raise_signal(getattr(signal, args[0]))
        elif op == "logits":
            (ids,) = args
            llm.reset()
            llm.eval(list(ids))
            results.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
        elif op == "greedy":
            prompt, n = args
            llm.reset()
            llm.eval(list(prompt))
            out, rows = [], []
            for _ in range(n):
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                rows.append(row)
                out.append(int(row.argmax()))
                llm.eval([out[-1]])
            results.append((out, np.stack(rows)))
        elif op == "tokenize":
            text, add_bos = args
            results.append(llm.tokenize(text.encode(), add_bos=add_bos, special=True))
        elif op == "detokenize":
            results.append(llm.detokenize(list(args[0]), special=True).decode())
        elif op == "detokenize_raw":
            ids = list(args[0])
            buf = ctypes.create_string_buffer(1 << 14)
            n = llama_cpp.llama_detokenize(llm._model.vocab, (llama_cpp.llama_token * len(ids))(*ids), len(ids),
                                           buf, len(buf), False, True)
            if n < 0:
                raise RuntimeError(f"llama_detokenize returned {n}")
            results.append(buf.raw[:n].decode())
        else:
            raise ValueError(f"unknown llama.cpp op {op!r}")
    llm.close()
    return results


if __name__ == "__main__":
    _req, _res = Path(sys.argv[1]), Path(sys.argv[2])
    _out = _child(pickle.loads(_req.read_bytes()))
    _tmp = _res.with_suffix(".part")
    _tmp.write_bytes(pickle.dumps(_out))
    os.replace(_tmp, _res)
