"""Config: TOML -> frozen dataclasses, one clear error naming file and key."""

import dataclasses

import pytest

from mpitrain import config
from mpitrain.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, '[train]\nepochs = 3\n[optim]\nlr = 1\n')
    cfg = config.load(p, ["train.batch_size=8", "data.mode=replicated", "model.hidden=[4, 5]"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 8
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.mode == "replicated" and cfg.model.hidden == (4, 5)
    assert cfg.output.name == "job" and str(cfg.run_dir) == "runs/job"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, '[model]\nname = "cnn"\n'), ["sync.bucket_mb=2.5"])
    again = config.load(write(tmp_path, cfg.dumps()))
    assert again == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("[train]\nepoch = 3\n", [], "job.toml: unknown key train.epoch"),
    ("[trian]\nepochs = 3\n", [], "job.toml: unknown section [trian]"),
    ("[train]\nepochs = 'ten'\n", [], "job.toml: train.epochs: expected an integer, got 'ten'"),
    ("[train]\nepochs = 2.5\n", [], "train.epochs: expected an integer"),
    ("[train]\nprogress = 1\n", [], "train.progress: expected true or false"),
    ("[train]\nbatch_size = -4\n", [], "train.batch_size: expected a value > 0, got -4"),
    ("[optim]\nlr = 0\n", [], "optim.lr: expected a value > 0"),
    ("[data]\nmode = 'sharded'\n", [], "data.mode: expected one of 'partitioned', 'replicated'"),
    ("[model]\nhidden = [4, 'x']\n", [], "model.hidden[1]: expected an integer"),
    ("[train\nepochs = 3\n", [], "job.toml: malformed TOML"),
    ("train = 3\n", [], "job.toml: train: expected a table"),
    ("", ["train.epochs=-1"], "(with --set): train.epochs: expected a value > 0, got -1"),
    ("", ["epochs=3"], "--set 'epochs=3': expected section.key=value"),
    ("", ["train.nope=3"], "unknown key train.nope"),
])
def test_bad_config_names_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as e:
        config.load(write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="no such job file"):
        config.load(tmp_path / "nope.toml")
