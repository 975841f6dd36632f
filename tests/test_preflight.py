"""engine.preflight: everything `moetune train` checks before anything loads, each problem with its field and the
exact message; `moetune train` runs it first and creates no run folder for a config that fails it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine import preflight as P
from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "assets" / "demo" / "model"
DEMO_TRAIN = ROOT / "assets" / "demo" / "train.jsonl"


def config(**sections) -> dict:
    base = {"model": {"path": str(DEMO_MODEL), "quant": "bf16"}, "data": {"train": str(DEMO_TRAIN), "max_len": 128},
            "train": {"max_steps": 2, "micro_batch": 4}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def messages(result: P.Preflight) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in result.problems]


def test_a_good_config_passes_and_returns_the_config():
    cfg = P.preflight(config(), gpus=1)
    assert cfg.data.train == str(DEMO_TRAIN) and cfg.train.max_steps == 2


def test_a_missing_data_file_names_the_field_and_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = P.check(config(data={"train": str(missing)}))
    assert messages(result) == [("data.train", f"data.train: data file {str(missing)!r} does not exist; give a JSON, "
                                               "JSONL, CSV or Parquet file, a saved HF dataset folder, or a name from "
                                               "the dataset registry.")]


def test_a_registry_dataset_whose_file_is_missing_says_where_to_put_it(tmp_path, monkeypatch):
    reg = tmp_path / "datasets.json"
    reg.write_text(json.dumps({"mine": {"file": "data/mine.json", "source": "https://example.org/mine"}}))
    monkeypatch.setenv("MOETUNE_DATASETS", str(reg))
    result = P.check(config(data={"train": "mine"}))
    assert messages(result) == [("data.train", f"data.train: dataset 'mine' (registry {reg}) points at "
                                               f"{tmp_path / 'data' / 'mine.json'}, which does not exist; put the file "
                                               "there or fix the entry's \"file\". Get it from https://example.org/mine.")]


def test_every_row_of_a_file_is_read_a_broken_line_far_down_is_found(tmp_path):
    rows = [json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) for i in range(600)]
    rows[499] = '{"instruction": "q499", "output": '  # line 500 is cut off
    f = tmp_path / "upload.jsonl"
    f.write_text("\n".join(rows) + "\n")
    assert messages(P.check(config(data={"train": str(f)}))) == [
        ("data.train", f"data.train: {f}, line 500: not valid JSON (Expecting value at column 35); fix the line or "
                       "remove it (JSON lines hold one object per line).")]
    rows[499] = json.dumps({"instruction": "q499", "input": ""})  # valid JSON, but no response
    f.write_text("\n".join(rows) + "\n")
    assert messages(P.check(config(data={"train": str(f)}))) == [
        ("data.train", f"data.train: {f}, line 500: field 'output' is missing; add the response text to every row.")]


def test_routing_layers_are_checked_against_the_models_config_json():
    # the demo model has 4 decoder layers, all MoE (config.json: num_hidden_layers 4)
    assert json.loads((DEMO_MODEL / "config.json").read_text())["num_hidden_layers"] == 4
    assert messages(P.check(config(routing={"layers": [0, 7]}))) == [
        ("routing.layers", "routing.layers: [7] are not MoE layers of this model; its MoE layers are [0, 1, 2, 3].")]
    assert P.check(config(routing={"layers": [0, 3]})).ok


def test_config_values_gpus_and_the_model_folder_name_their_field(tmp_path):
    bad = P.check(config(train={"lr": -1}))
    assert bad.config is None and messages(bad) == [
        ("train.lr", "train.lr: -1.0 is out of range; it must be at least 0.0.")]
    assert messages(P.check(config(), gpus=0)) == [
        ("gpus", "GPUs 0: give the number of GPUs (processes) on this machine, 1 or more: 1 trains one process (on "
                 "the GPU when there is one, else the CPU), more train data parallel.")]
    assert [p.field for p in P.check(config(model={"path": str(tmp_path)})).problems] == ["model.path"]
    assert P.check(config(model={"path": str(tmp_path)})).problems[0].message == (
        f"model.path: {tmp_path / 'config.json'} is missing; model.path must be a HF checkpoint directory with "
        "config.json.")
    assert messages(P.check(config(data={"train": str(DEMO_TRAIN)}, train={"micro_batch": 4000}))) == [
        ("data.train", f"data.train: {DEMO_TRAIN} holds 2000 row(s), and one optimizer step takes 4000 "
                       "(train.micro_batch × train.grad_accum × processes); add rows or lower train.micro_batch / "
                       "train.grad_accum.")]


def test_gpus_beyond_one_on_a_machine_without_gpu_is_a_note_not_a_refusal(monkeypatch):
    monkeypatch.setattr(P, "gpu_count", lambda: 0)
    result = P.check(config(), gpus=2)
    assert result.ok and [n.field for n in result.notes] == ["gpus"]
    assert result.notes[0].message.startswith("GPUs 2: this machine has no GPU, so 2 processes will train on the CPU")
    monkeypatch.setattr(P, "gpu_count", lambda: 1)
    assert messages(P.check(config(), gpus=2)) == [
        ("gpus", "GPUs 2: this machine shows 1 GPU(s); give at most 1.")]


def test_moetune_train_refuses_before_the_run_folder_exists(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(config(data={"train": str(tmp_path / "gone.jsonl")})))
    out = tmp_path / "runs" / "r"
    assert main(["train", str(cfg_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moetune train: error: data.train: data file {str(tmp_path / 'gone.jsonl')!r} does not exist")
    assert not out.exists() and not (tmp_path / "runs").exists()
    cfg_file.write_text(yaml.safe_dump(config(routing={"layers": [9]})))
    assert main(["train", str(cfg_file), "--out", str(out)]) == 2
    assert "routing.layers: [9] are not MoE layers of this model" in capsys.readouterr().err and not out.exists()
