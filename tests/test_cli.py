"""The `moetune` command line: commands exist, print facts, and fail with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.cli import main
from engine.model import read_config

VENV_BIN = Path(sys.executable).parent


def test_models_json_lists_every_family(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["model_type"]: r for r in rows}
    assert {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3",
            "glm4_moe", "qwen3_5_moe"} <= set(by)
    assert (by["gpt_oss"]["experts"], by["gpt_oss"]["top_k"], by["gpt_oss"]["experts_nf4_gb"]) == (32, 4, 9.87)
    assert (by["deepseek_v3"]["moe_layers"], by["deepseek_v3"]["experts"], by["deepseek_v3"]["top_k"]) == (26, 64, 6)
    assert by["deepseek_v3"]["shared_expert_intermediate_size"] == 2 * 1408 and by["deepseek_v3"]["experts_nf4_gb"] == 7.43
    assert "sigmoid" in by["deepseek_v3"]["router"] and "softmax" in by["deepseek_v2"]["router"]
    assert (by["glm4_moe"]["moe_layers"], by["glm4_moe"]["experts"], by["glm4_moe"]["experts_nf4_gb"]) == (45, 128, 51.45)
    assert (by["qwen3_5_moe"]["moe_layers"], by["qwen3_5_moe"]["experts"], by["qwen3_5_moe"]["experts_nf4_gb"]) == \
        (40, 256, 16.63)
    assert (by["mixtral"]["experts"], by["mixtral"]["top_k"], by["mixtral"]["moe_layers"]) == (8, 2, 32)
    assert by["qwen2_moe"]["shared_expert_intermediate_size"] == 5632
    assert by["olmoe"]["experts_nf4_gb"] == 3.33
    assert (by["granitemoe"]["moe_layers"], by["granitemoe"]["experts"], by["granitemoe"]["top_k"],
            by["granitemoe"]["experts_nf4_gb"]) == (32, 40, 8, 1.56)
    assert (by["granitemoehybrid"]["moe_layers"], by["granitemoehybrid"]["experts"], by["granitemoehybrid"]["top_k"],
            by["granitemoehybrid"]["shared_expert_intermediate_size"]) == (40, 64, 6, 1024)
    assert (by["glm4_moe_lite"]["moe_layers"], by["glm4_moe_lite"]["experts"], by["glm4_moe_lite"]["top_k"],
            by["glm4_moe_lite"]["experts_nf4_gb"]) == (46, 64, 4, 14.34)
    assert (by["qwen3_next"]["moe_layers"], by["qwen3_next"]["experts"], by["qwen3_next"]["top_k"],
            by["qwen3_next"]["experts_nf4_gb"]) == (48, 512, 10, 39.91)
    assert (by["gemma4"]["moe_layers"], by["gemma4"]["experts"], by["gemma4"]["top_k"], by["gemma4"]["experts_nf4_gb"],
            by["gemma4"]["shared_expert_intermediate_size"]) == (30, 128, 8, 11.79, 2112)  # its dense MLP
    assert by["gemma4"]["gguf_missing"] and not any(r["gguf_missing"] for r in rows if r["model_type"] != "gemma4")


def test_tiny_model_command(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["tiny-model", "--family", "mixtral", "--out", str(out), "--layers", "3", "--experts", "8"]) == 0
    cfg, fam = read_config(out)
    assert (cfg.num_hidden_layers, cfg.num_local_experts, fam.model_type) == (3, 8, "mixtral")


def test_console_script_reports_errors(tmp_path):
    exe = VENV_BIN / "moetune"
    run = subprocess.run([str(exe), "tiny-model", "--family", "olmoe", "--out", str(tmp_path), "--top-k", "9"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "top-k" in run.stderr and "Traceback" not in run.stderr
    ui = subprocess.run([str(exe), "ui", "--help"], capture_output=True, text=True)
    assert ui.returncode == 0 and "--port" in ui.stdout
