import pytest

from heimdall.config import ConfigError, FitConfig, flatten, load_config


def test_overrides_beat_the_file_and_no_file_gives_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\nmodel:\n  size: tiny\n")
    cfg = load_config(path, ["optim.lr=5e-4", "trainer.max_epochs=3", "model.dropout=0.1"])
    assert cfg.optim.lr == 5e-4 and cfg.trainer.max_epochs == 3 and cfg.model.dropout == 0.1
    assert flatten(cfg)["optim.lr"] == 5e-4
    assert load_config(None) == FitConfig()


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'trainer.epochs'"):
        load_config(None, ["trainer.epochs=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="config key 'data.batch_size'"):
        load_config(None, ["data.batch_size=lots"])
    with pytest.raises(ConfigError, match="config key 'optim.lr'"):
        load_config(None, ["optim.lr=-1"])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
