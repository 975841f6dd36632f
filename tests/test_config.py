"""Config: YAML round trip, overrides, and errors that name the field."""

from __future__ import annotations

import pytest

from engine import config as C
from engine.config import ConfigError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = C.from_dict({"model": {"path": "/m"}, "routing": {"strategy": "routed", "top_k": 1, "layers": [0, 2]}})
    C.save(cfg, tmp_path / "c.yaml")
    again = C.load(tmp_path / "c.yaml")
    assert again == cfg
    assert again.routing.layers == [0, 2]


def test_overrides_parse_values_as_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n")
    cfg = C.load(tmp_path / "c.yaml", ["routing.top_k=4", "train.epochs=2", "routing.attention_lora=true",
                                       "routing.layers=[1, 3]", "train.lr=2e-5"])
    assert cfg.routing.top_k == 4 and cfg.train.epochs == 2.0 and cfg.routing.attention_lora is True
    assert cfg.routing.layers == [1, 3]
    assert cfg.train.lr == 2e-5


@pytest.mark.parametrize("data, fragments", [
    ({"routing": {"topk": 2}}, ["routing.topk", "unknown key", "did you mean 'top_k'"]),
    ({"trian": {}}, ["trian", "unknown key", "did you mean 'train'"]),
    ({"train": {"micro_batch": "four"}}, ["train.micro_batch", "expected an integer", "'four'"]),
    ({"routing": {"attention_lora": "yes"}}, ["routing.attention_lora", "expected true/false"]),
    ({"adapter": {"rank": 0}}, ["adapter.rank", "out of range", "at least 1"]),
    ({"adapter": {"dropout": 1.5}}, ["adapter.dropout", "out of range", "at most 0.99"]),
    ({"routing": {"strategy": "sparse"}}, ["routing.strategy", "'sparse'", "shared, dense, routed, embedded, none"]),
    ({"model": {"quant": "int8"}}, ["model.quant", "nf4, bf16"]),
    ({"routing": {"layers": "every:0"}}, ["routing.layers", "every:N"]),
    ({"routing": {"strategy": "routed", "num_adapters": 2, "top_k": 3}}, ["routing.top_k", "num_adapters"]),
    ({"adapter": {"placement": "inside", "kind": "gated"}}, ["adapter.placement", "lora", "embedded"]),
    ({"train": {"lr": None}}, ["train.lr", "required"]),
])
def test_errors_name_the_field(data, fragments):
    with pytest.raises(ConfigError) as e:
        C.from_dict(data)
    for frag in fragments:
        assert frag in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        C.apply_overrides({}, ["routing.top_k"])
    with pytest.raises(ConfigError, match="section.key"):
        C.apply_overrides({}, ["top_k=2"])


def test_layer_selection():
    moe = (0, 1, 2, 3, 4, 5)
    assert C.from_dict({}).layer_indices(moe) == list(moe)
    assert C.from_dict({"routing": {"layers": "every:2"}}).layer_indices(moe) == [0, 2, 4]
    assert C.from_dict({"routing": {"layers": [5, 1]}}).layer_indices(moe) == [1, 5]
    with pytest.raises(ConfigError, match=r"routing.layers: \[9\] are not MoE layers"):
        C.from_dict({"routing": {"layers": [9]}}).layer_indices(moe)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(tmp_path / "bad.yaml")
