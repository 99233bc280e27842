"""Config: one typed source of truth, mapped from flags and YAML. No Ray needed."""

import argparse

import pytest

from cifar_ray.config import PRESETS, Config
from cifar_ray.flags import add_config_flags, config_from_args


def parse(argv, sections=("data", "model", "train", "scaling", "run")):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, sections)
    return config_from_args(parser.parse_args(argv))


def test_flags_map_onto_sections():
    cfg = parse(["--num-workers", "3", "--lr", "0.01", "--model", "shallow_cnn", "--use-gpu",
                 "--data", "synthetic", "--limit", "100"])
    assert cfg.scaling.num_workers == 3 and cfg.scaling.use_gpu is True
    assert cfg.train.lr == 0.01 and cfg.model.model == "shallow_cnn"
    assert cfg.data.data == "synthetic" and cfg.data.limit == 100
    assert cfg.train.epochs == Config().train.epochs  # untouched fields keep defaults


def test_preset_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.5\nscaling:\n  num_workers: 2\n")
    cfg = parse(["--preset", "smoke", "--config", str(path), "--lr", "0.25"])
    assert cfg.data.data == "synthetic"  # from the preset
    assert cfg.train.epochs == 7 and cfg.scaling.num_workers == 2  # from YAML
    assert cfg.train.lr == 0.25  # flag wins


@pytest.mark.parametrize("text, message", [
    ("train:\n  epoch: 3\n", "unknown key"),
    ("trian:\n  epochs: 3\n", "unknown config section"),
    ("train:\n  epochs: three\n", "expected int"),
    ("model:\n  model: resnet999\n", "not one of"),
])
def test_yaml_rejects_mistakes(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse(["--config", str(path)])


def test_round_trip_through_dict():
    cfg = PRESETS["smoke"].with_overrides({"lr": 0.3, "name": "x"})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_override_of_unknown_key_fails():
    with pytest.raises(ValueError, match="unknown config key"):
        Config().with_overrides({"learning_rate": 1.0})


def test_a_models_recipe_applies_under_yaml_and_flags(tmp_path):
    cfg = parse(["--model", "fast_resnet"])
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.train.label_smoothing) == ("sgd_coupled", "triangle", 0.2)
    assert cfg.model.tta and cfg.train.lookahead and cfg.data.crop_padding == 2
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model: fast_resnet\ntrain:\n  epochs: 3\n")
    cfg = parse(["--config", str(path), "--lr", "0.05"])
    assert cfg.train.optimizer == "sgd_coupled"  # recipe of the model chosen in YAML
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.05)  # YAML and flags win over it
    assert parse(["--model", "shallow_cnn"]).train.optimizer == Config().train.optimizer
