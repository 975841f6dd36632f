"""engine/quiet.py: bitsandbytes' two "kernels-community ... offline mode" lines, printed on every CPU import while
the Hub is offline, are gone once the engine is imported; other warnings of the same loggers still show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stderr(code: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300).stderr


def test_the_offline_kernel_notices_are_silenced_and_nothing_else():
    bare = _stderr("import bitsandbytes")
    if "kernels-community" not in bare:
        pytest.skip("this CPU / bitsandbytes build does not try the kernels-community kernel (no avx512_bf16?)")
    assert "offline mode" in bare  # what a user saw on every CPU `moetune chat`
    quiet = _stderr("import engine, bitsandbytes, logging\n"
                    "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')")
    assert "kernels-community" not in quiet and "offline mode" not in quiet
    assert "another warning" in quiet
