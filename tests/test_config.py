import pytest
from omegaconf import OmegaConf

from medvlp import config as C


def test_default_composition_is_clip_on_demo():
    cfg = C.compose()
    assert cfg.method.name == "clip" and cfg.data.name == "mimic_cxr" and cfg.data.root == "demo"
    assert cfg.method.image_encoder.in_chans == cfg.data.channels == 1  # interpolation


def test_unknown_key_names_full_path_and_suggestion():
    with pytest.raises(C.ConfigError) as err:
        C.compose(method="clip", overrides=["trainer.max_epoch=1"])
    msg = str(err.value)
    assert "'trainer.max_epoch'" in msg and "Did you mean 'trainer.max_epochs'?" in msg


def test_unknown_nested_key():
    with pytest.raises(C.ConfigError, match=r"method\.image_encoder\.modle.*Did you mean 'method\.image_encoder\.model'"):
        C.compose(method="clip", overrides=["method.image_encoder.modle=resnet50"])


def test_wrong_type_names_expected_type():
    with pytest.raises(C.ConfigError) as err:
        C.compose(method="clip", overrides=["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(err.value) and "int" in str(err.value)


def test_unknown_section_and_group_file():
    with pytest.raises(C.ConfigError, match="Did you mean 'trainer'"):
        C.compose(method="clip", overrides=["trainr.max_steps=1"])
    with pytest.raises(C.ConfigError, match="Did you mean 'clip'"):
        C.compose(method="clpi")


def test_override_without_equals():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.compose(overrides=["trainer.max_steps"])


def test_config_file_with_compose_and_saved_roundtrip(tmp_path):
    cfg = C.compose(config_file=str(C.config_dir() / "experiment" / "clip_demo_ct.yaml"))
    assert cfg.method.image_encoder.name == "vit3d" and cfg.data.name == "ct_rate"
    cfg.data.root = "/somewhere"
    C.resolve(cfg)
    path = tmp_path / "config.yaml"
    C.save(cfg, path)
    again = C.compose(config_file=str(path), overrides=["trainer.max_steps=7"])
    assert again.trainer.max_steps == 7
    assert OmegaConf.to_container(again.method) == OmegaConf.to_container(cfg.method)


def test_every_config_file_composes():
    for name in C.group_options("method"):
        C.compose(method=name)
    for name in C.group_options("data"):
        C.compose(data=name)
    for name in C.group_options("trainer"):
        C.compose(trainer=name)
    for name in C.group_options("experiment"):
        C.compose(config_file=str(C.config_dir() / "experiment" / f"{name}.yaml"))


def test_missing_required_value():
    cfg = C.compose(data="mimic_cxr")  # the real-data config leaves the root to the user
    with pytest.raises(C.ConfigError, match="data.root"):
        C.resolve(cfg)
