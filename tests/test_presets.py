"""Every preset loads and validates, carries a title and a one-line description, and the app turns
it into widget values and back without changing it; relative paths resolve against the project root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app import controls as K
from app.paths import ROOT, resolve_config_paths
from app.presets import DEMO, list_presets, load_preset
from engine import config as C

PRESET_FILES = sorted((ROOT / "presets").glob("*.yaml"))
REAL_MODELS = ("olmoe", "mixtral", "qwen1.5-moe", "qwen3-30b-a3b", "gpt-oss-20b", "ernie-4.5-21b-a3b")


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_loads_and_validates(path):
    cfg = C.load(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.title.strip() and cfg.description.strip() and "\n" not in cfg.description
    # every key in the file is a real field (from_dict rejects unknown keys) and survives the round trip
    assert C.from_dict(cfg.to_dict()) == cfg
    for section, fields in raw.items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                assert getattr(getattr(cfg, section), key) == value or isinstance(value, str), (section, key)


def test_presets_cover_the_demo_and_every_real_model_on_commonsense_and_math():
    names = [p.name for p in list_presets()]
    assert names[0] == DEMO
    for model in REAL_MODELS:
        for task in ("commonsense", "math"):
            assert any(n.startswith(model) and task in n for n in names), (model, task)


@pytest.mark.parametrize("path", [p for p in PRESET_FILES if p.stem != DEMO], ids=lambda p: p.stem)
def test_real_model_presets_follow_the_paper_recipe(path):
    cfg = C.load(path)
    t, a = cfg.train, cfg.adapter
    assert (t.epochs, t.warmup_steps, t.scheduler, cfg.data.max_len) == (3, 100, "linear", 256)
    assert t.micro_batch * t.grad_accum * t.expert_parallel == 16  # on expert_parallel GPUs: the paper's batch
    assert a.alpha == 2 * a.rank and a.dropout == 0.05
    assert cfg.model.path.startswith("~/models/")
    assert cfg.memory.gpu_gb == 24
    # the paper's code: its initialisation (which its small lr needs), the balance loss on both routers
    assert a.init == "perft" and cfg.routing.base_balance_loss == cfg.routing.balance_loss > 0
    assert cfg.data.train_on_prompt  # its train_on_inputs=True
    assert "perft init" in cfg.description and "both routers" in cfg.description and "prompt" in cfg.description
    if path.stem.startswith("olmoe"):
        assert (t.lr, cfg.routing.balance_loss) == (1e-5, 0.01)
    if path.stem.startswith("mixtral"):
        assert (t.lr, cfg.routing.balance_loss) == (2e-5, 0.02)
    bench = "math" if "math" in path.stem else "commonsense"
    # a run split over GPUs is scored after training in one process (`moetune eval`), not by the trainer
    assert cfg.eval.benchmarks == ([bench] if t.expert_parallel == 1 else []) and cfg.data.train.startswith(bench)


def test_demo_preset_points_at_the_shipped_demo():
    cfg = load_preset(DEMO)
    data = resolve_config_paths(cfg.to_dict())
    assert (Path(data["model"]["path"]) / "config.json").is_file()
    assert Path(data["data"]["train"]).is_file()
    assert all(Path(b).is_file() for b in data["eval"]["benchmarks"])


def test_relative_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # wherever the app was started from
    data = resolve_config_paths({"model": {"path": "assets/demo/model"},
                                 "data": {"train": "commonsense_170k", "eval": "assets/demo/eval.json"},
                                 "eval": {"benchmarks": ["gsm8k", "assets/demo/eval.json"]}})
    assert data["model"]["path"] == str(ROOT / "assets/demo/model")
    assert data["data"]["train"] == "commonsense_170k"  # a registry name stays a name
    assert data["eval"]["benchmarks"] == ["gsm8k", str(ROOT / "assets/demo/eval.json")]
    assert resolve_config_paths({"model": {"path": "~/models/x"}})["model"]["path"] == str(Path.home() / "models/x")


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_widgets_round_trip_a_preset(path):
    cfg = C.load(path).to_dict()
    ctl = K.Controls()
    for fields in K.GROUPS.values():
        for fid in fields:
            ctl.widgets[fid] = None  # ids only: no Gradio needed to check the value conversions
    for fid in ("model.path", "data.train", "memory.gpu_gb"):
        ctl.widgets[fid] = None
    values = ctl.values_of(cfg)
    assert K.config_dict(ctl.to_dict(cfg, values)) == cfg
    assert K.overrides(cfg, cfg) == []
    changed = ctl.to_dict(cfg, values)
    changed["train"]["lr"] = 0.5
    assert K.overrides(cfg, K.config_dict(changed)) == ["train.lr=0.5"]


@pytest.mark.parametrize("stem, offloaded", [("olmoe-commonsense", False), ("mixtral-math-24gb", True),
                                             ("mixtral-commonsense-2gpu", False), ("qwen3-30b-a3b-math", None),
                                             ("deepseek-v2-lite-commonsense", False),
                                             ("moonlight-16b-a3b-commonsense", False),
                                             ("glm-4.5-air-commonsense-24gb", True),
                                             ("qwen3.5-35b-a3b-commonsense", False),
                                             ("qwen3-next-80b-a3b-commonsense", True),
                                             ("glm-4.7-flash-commonsense", False),
                                             ("granite-3.1-3b-a800m-commonsense", False),
                                             ("gemma-4-26b-a4b-commonsense", False)])
def test_check_fit_answers_for_real_model_presets_before_download(stem, offloaded, tmp_path, monkeypatch):
    """The app's Check fit (`moetune plan` on the resolved preset) answers before the model is downloaded:
    OLMoE-1B-7B fits a 24 GB card resident, Mixtral-8x7B fits it only with experts offloaded, or resident on
    each of two 24 GB cards with its experts split between them (expert parallel 2)."""
    from app import commands

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/models here, whatever this machine holds
    data = resolve_config_paths(load_preset(stem).to_dict())
    fits, text = commands.check_fit(data, 24)
    host = re.search(r"host RAM: needs ≈ ([\d.]+) GB of ([\d.]+) GB", text)
    if host and float(host[1]) > float(host[2]):  # GLM-4.5-Air on a machine short of host RAM: refused, named
        assert fits is False and "host RAM: the offloaded experts need" in text, text
    else:
        assert fits is True, text
    assert "(published config;" in text.splitlines()[0]
    if offloaded is not None:  # the placement lines: "  resident   layers 0-15" / "  offloaded  layers 0-6"
        assert bool(re.search(r"^\s+offloaded\s+layers", text, re.M)) is offloaded, text


def test_the_model_picker_offers_every_published_release_where_the_presets_look(tmp_path, monkeypatch):
    """The app's model picker lists every release `moetune models` plans from (engine/model/arch/published/), at
    ~/models/<name> where the presets look, marked with where to put it until it is downloaded; every family has
    one; no torch is imported to list them."""
    import subprocess
    import sys

    from app.train_form import model_choices
    from engine.model.arch import FAMILIES
    from engine.releases import published_releases

    monkeypatch.setenv("HOME", str(tmp_path))
    releases = published_releases()
    (tmp_path / "models" / "gpt-oss-20b").mkdir(parents=True)
    (tmp_path / "models" / "gpt-oss-20b" / "config.json").write_text("{}")
    labels = dict((v, label) for label, v in model_choices())
    for r in releases:
        assert r.folder in labels, r.name
        assert labels[r.folder].startswith(f"{r.name} ({r.model_type})")
        assert ("not downloaded: put it at ~/models/" in labels[r.folder]) == (r.name != "gpt-oss-20b"), labels[r.folder]
    assert {r.model_type for r in releases} == set(FAMILIES)  # every family's flagship, nothing else
    for path in PRESET_FILES:  # every real-model preset points at a release the picker offers
        model = yaml.safe_load(path.read_text())["model"]["path"]
        assert path.stem == DEMO or model in labels, (path.name, model)
    probe = "import sys; from app.train_form import model_choices; model_choices(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=str(ROOT),
                          check=True).stdout.strip() == "False"
