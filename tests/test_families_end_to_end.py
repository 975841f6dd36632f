"""Every family, the same path a user takes: train (embedded LoRA inside the experts + attention LoRA, from a
bf16 checkpoint in the hub's layout), stop and resume to the same losses, chat and score a benchmark through the
CLI, its loss falling. The per-family details (every strategy against the reference forward, merges, PEFT, GGUF) are in the
family-parametrised tests of routing, export and layer-major training."""

from __future__ import annotations

import pytest

from .conftest import FAMILY_NAMES
from .tiny_run import bf16_copy, check_resume_chat_eval, tiny_run_config, train_whole_and_resumed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_trains_resumes_exactly_chats_and_evaluates(family, tiny_checkpoint, tmp_path, capsys):
    base = bf16_copy(tiny_checkpoint(family), tmp_path / "base")
    full, parts = train_whole_and_resumed(tiny_run_config(base, tmp_path, steps=6), tmp_path)
    losses = check_resume_chat_eval(full, parts, tmp_path, capsys)
    assert losses[6] < losses[1], losses  # it learns (lr 1e-2 on 64 rows of one task)
