"""raymim.config: YAML + --set overrides, validation that names the bad value, flattening, and
the per-method ``method`` sections (each method's own registered config class)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raymim.config import (
    ConfigError,
    MethodConfig,
    RaymimConfig,
    config_from_dict,
    config_hash,
    dump_yaml,
    flatten,
    load_config,
    method_config,
    method_configs,
    parse_override,
    to_dict,
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
    with pytest.raises(ConfigError, match=r"train.stepz \(did you mean steps\?\)"):
        load_config(None, ["train.stepz=5"])
    with pytest.raises(ConfigError, match="known: "):  # nothing close: the known keys are listed
        load_config(None, ["train.zzzz=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("method.mask_ratio")


# ---- the method section: the chosen method's own config ------------------------------------


def test_method_section_is_the_chosen_methods_class():
    assert type(load_config(None).method).__name__ == "MAEConfig"  # the default method
    cfg = load_config(CONFIGS / "mim-tiny.yaml")
    assert type(cfg.method).__name__ == "MiMConfig" and cfg.method.name == "mim" and cfg.method.gamma == 2
    assert isinstance(cfg.method, MethodConfig)
    assert {"mae", "simmim", "mim", "mps_ams", "medim", "hssl", "simclr"} <= set(method_configs())
    # one class per method, each holding its own fields only
    assert len({id(c) for c in method_configs().values()}) == len(method_configs())
    assert "levels" not in {f for f in to_dict(method_config("mae"))}
    assert set(to_dict(method_config("simclr"))) == {"name", "tau", "proj_dim"}


def test_unknown_method_field_suggests_the_closest_key():
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "mim-tiny.yaml", ["method.gama=3"])
    assert str(exc.value) == "method.gama is not a field of method 'mim'; did you mean method.gamma?"
    with pytest.raises(ConfigError, match=r"method.mask_ration is not a field of method 'mae'; did you mean "
                                          r"method.mask_ratio\?"):
        load_config(None, ["method.mask_ration=0.5"])
    with pytest.raises(ConfigError, match=r"method.zzzz is not a field of method 'mae'; its fields: \['mask_block'"):
        load_config(None, ["method.zzzz=1"])
    with pytest.raises(ConfigError, match=r"method.name should be one of .*got 'mimm'; did you mean 'mim'\?"):
        load_config(None, ["method.name=mimm"])


def test_field_of_another_method_names_its_owner():
    with pytest.raises(ConfigError, match=r"method.gamma is not a field of method 'mae'; it is a field of methods "
                                          r"'mim', 'mps_ams'"):
        load_config(None, ["method.gamma=3"])
    with pytest.raises(ConfigError, match=r"method.medim_mode is not a field of method 'mim'; it is a field of "
                                          r"method 'medim'"):
        config_from_dict({"method": {"name": "mim", "medim_mode": "sdm"}})
    with pytest.raises(ConfigError, match="method.rec_weight is not a field of method 'simclr'"):
        method_config("simclr", rec_weight=1.0)


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("mim", "method.alpha=-1", "method.alpha should be >= 0, got -1.0."),
        ("mim", "method.levels=7", "method.levels should be in the range [1, 4], got 7."),
        ("mim", "method.level1_scale=[0.5, 0.2]", "method.level1_scale should be [lo, hi] with 0 < lo <= hi <= 1, "
                                                  "got [0.5, 0.2]."),
        ("mps_ams", "method.mps_mode=offline", "method.mps_mode should be one of ('online', 'prior', 'none'), "
                                               "got 'offline'."),
        ("medim", "method.medim_low_share=1.5", "method.medim_low_share should be in the range [0.0, 1.0], got 1.5."),
        ("hssl", "method.domains=[a, a]", "method.domains should hold distinct names, got ['a', 'a']."),
        ("simclr", "method.tau=0", "method.tau should be > 0, got 0.0."),
        ("simmim", "method.mask_block=0", "method.mask_block should be > 0, got 0."),
        ("mae", "method.recon_loss=l2", "method.recon_loss should be one of ('auto', 'mse', 'l1'), got 'l2'."),
    ],
)
def test_method_validation_names_the_value(method, override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"method.name={method}", override])
    assert str(exc.value) == message


def test_changing_method_name_keeps_the_fields_the_new_method_owns():
    """A ``--set method.name`` (or a YAML over a base of another method) keeps the lower layer's
    fields the new method owns, drops the others; fields set with it must be the new method's."""
    cfg = load_config(CONFIGS / "hssl-tiny.yaml", ["method.name=simclr"])
    assert type(cfg.method).__name__ == "SimCLRConfig" and cfg.method.tau == 0.2
    cfg = load_config(CONFIGS / "mim-tiny.yaml", ["method.name=mae"])
    assert to_dict(cfg.method) == {"name": "mae", "mask_ratio": 0.6, "norm_pix_loss": False, "recon_loss": "auto",
                                   "mask_block": 1}
    with pytest.raises(ConfigError, match="method.mask_ratio is not a field of method 'simclr'"):
        load_config(CONFIGS / "mae-tiny.yaml", ["method.name=simclr", "method.mask_ratio=0.5"])
    # base chain: tune-mps-ams.yaml extends mae.yaml (name: mae, norm_pix_loss: true) as mps_ams
    cfg = load_config(CONFIGS / "tune-mps-ams.yaml")
    assert cfg.method.name == "mps_ams" and cfg.method.norm_pix_loss is True and cfg.method.levels == 1


def test_base_yaml_of_another_method(tmp_path):
    (tmp_path / "base.yaml").write_text("method:\n  name: mim\n  levels: 2\n  level_sizes: [64, 16]\n  tau: 0.5\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nmethod:\n  name: simclr\n")
    assert to_dict(load_config(tmp_path / "top.yaml").method) == {"name": "simclr", "tau": 0.5, "proj_dim": 128}
    (tmp_path / "bad.yaml").write_text("base: base.yaml\nmethod:\n  name: simclr\n  gamma: 2\n")
    with pytest.raises(ConfigError, match="method.gamma is not a field of method 'simclr'"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", ["mae", "simmim", "mim", "mps_ams", "medim", "hssl", "simclr"])
def test_method_round_trip_yaml_config_flatten(name, tmp_path):
    """YAML -> config -> flatten -> unflatten -> config, and config -> dump_yaml -> config: equal,
    the same hash, and only the chosen method's fields in the flat params."""
    cfg = config_from_dict({"method": {"name": name}})
    flat = flatten(cfg)
    method_keys = {k.split(".", 1)[1] for k in flat if k.startswith("method.")}
    assert method_keys == set(to_dict(cfg.method))
    back = config_from_dict(unflatten(flat))
    assert back == cfg and config_hash(back) == config_hash(cfg)
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and type(again.method) is type(cfg.method)
    assert set(yaml.safe_load(dump_yaml(cfg))["method"]) == method_keys


def test_method_config_is_not_built_without_registration():
    with pytest.raises(TypeError, match="not a registered method config"):
        MethodConfig()


def test_yaml_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  lr: 0.5\nmethod:\n  name: mim\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.batch_size=3"])
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size, cfg.method.name) == (9, 0.5, 3, "mim")


def test_flatten_roundtrip_and_hash():
    cfg = load_config(CONFIGS / "mim-tiny.yaml", ["method.alpha=0.3"])
    flat = flatten(cfg)
    assert flat["method.alpha"] == 0.3 and "method.medim_mode" not in flat
    back = config_from_dict(unflatten(flat))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    assert config_hash(load_config(CONFIGS / "mim-tiny.yaml", ["method.alpha=0.2"])) != config_hash(cfg)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RaymimConfig)
    assert type(cfg.method) is method_configs()[cfg.method.name]


def test_cli_reports_a_bad_method_field_in_one_line(capsys, tmp_path):
    from raymim.cli import main

    argv = ["pretrain", "--config", str(CONFIGS / "mim-tiny.yaml"), "--data", str(tmp_path), "--set", "method.gama=3"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == ("raymim pretrain: config error: method.gama is not a field of method "
                                               "'mim'; did you mean method.gamma?")


def test_a_saved_config_from_before_the_typed_method_configs_still_loads():
    """Checkpoints written with the old 40-field method section keep loading for fine-tuning:
    the fields their method does not own are dropped, the owned ones kept."""
    import yaml

    from raymim.config import config_from_saved, dump_yaml, load_config

    saved = yaml.safe_load(dump_yaml(load_config(None, ["method.name=mae", "method.mask_ratio=0.6"])))
    saved["method"].update({"levels": 3, "gamma": 4, "mps_mode": "online", "tau": 0.2})  # the old layout
    with pytest.raises(ConfigError, match="method.gamma is not a field of method 'mae'"):
        config_from_dict(saved)
    cfg = config_from_saved(saved)
    assert cfg.method.name == "mae" and cfg.method.mask_ratio == 0.6
    assert not hasattr(cfg.method, "gamma")
