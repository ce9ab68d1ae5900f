"""raymim.config: YAML + --set overrides, validation that names the bad value, flattening."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymim.config import (
    ConfigError,
    RaymimConfig,
    config_from_dict,
    config_hash,
    flatten,
    load_config,
    parse_override,
    unflatten,
)

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_defaults_and_overrides():
    cfg = load_config(None, ["method.mask_ratio=0.6", "train.steps=20", "prepare.crop_size=[32, 32, 32]",
                             "prepare.spacing=null", "method.norm_pix_loss=true"])
    assert cfg.method.mask_ratio == 0.6
    assert cfg.train.steps == 20
    assert cfg.prepare.crop_size == [32, 32, 32]
    assert cfg.prepare.spacing is None
    assert cfg.method.norm_pix_loss is True


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method.mask_ratio=1.5", "1.5"),
        ("method.levels=7", "7"),
        ("train.precision=fp8", "fp8"),
        ("train.steps=abc", "abc"),
        ("prepare.crop_size=[4, 4, 4]", "[4, 4, 4]"),
        ("model.img_size=100", "100"),
    ],
)
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_exponent_without_dot_is_a_number():
    cfg = load_config(None, ["train.lr=5e-4", "train.steps=1e3"])
    assert cfg.train.lr == 5e-4 and cfg.train.steps == 1000


def test_unknown_keys_rejected():
    with pytest.raises(ConfigError, match=r"method.mask_ration \(did you mean mask_ratio\?\)"):
        load_config(None, ["method.mask_ration=0.5"])
    with pytest.raises(ConfigError, match="known: "):  # nothing close: the known keys are listed
        load_config(None, ["method.zzzz=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("method.mask_ratio")


def test_yaml_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  lr: 0.5\nmethod:\n  name: mim\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.batch_size=3"])
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size, cfg.method.name) == (9, 0.5, 3, "mim")


def test_flatten_roundtrip_and_hash():
    cfg = load_config(None, ["method.alpha=0.3"])
    flat = flatten(cfg)
    assert flat["method.alpha"] == 0.3
    back = config_from_dict(unflatten(flat))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    assert config_hash(load_config(None, ["method.alpha=0.2"])) != config_hash(cfg)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), RaymimConfig)
