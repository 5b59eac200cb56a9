"""Config: TOML -> frozen dataclasses, per-strategy option tables, one clear error naming
file and key."""

import dataclasses

import pytest

from mpitrain import config
from mpitrain.errors import UserError
from mpitrain.sync import REGISTRY


def write(tmp_path, text, name="job.toml"):
    p = tmp_path / name
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
    cfg = config.load(write(tmp_path, '[model]\nname = "cnn"\n'), ["sync.allreduce.bucket_mb=2.5"])
    assert cfg.sync.options.bucket_mb == 2.5
    again = config.load(write(tmp_path, cfg.dumps()))
    assert again == cfg


def test_strategy_options_from_their_own_table(tmp_path):
    p = write(tmp_path, '[sync]\nstrategy = "bmuf"\n[sync.bmuf]\nperiod = 3\nmomentum = 0.0\nlr = 1.0\n'
                        'nesterov = false\n')
    cfg = config.load(p)
    assert cfg.sync.strategy == "bmuf" and isinstance(cfg.sync.options, REGISTRY["bmuf"].Options)
    assert (cfg.sync.options.period, cfg.sync.options.momentum, cfg.sync.options.lr,
            cfg.sync.options.nesterov) == (3, 0.0, 1.0, False)
    # nested --set, on top of the file
    cfg = config.load(p, ["sync.bmuf.momentum=0.9"])
    assert cfg.sync.options.momentum == 0.9 and cfg.sync.options.period == 3
    # the resolved config keeps the selected strategy's table only, and loads back the same
    assert config.load(write(tmp_path, cfg.dumps())) == cfg
    assert cfg.to_dict()["sync"] == {"strategy": "bmuf", "bmuf": dataclasses.asdict(cfg.sync.options)}


def test_switching_strategy_keeps_other_tables_validated(tmp_path):
    p = write(tmp_path, '[sync]\nstrategy = "bmuf"\n[sync.bmuf]\nperiod = 3\n[sync.ssp]\nstaleness = 1\n')
    cfg = config.load(p, ["sync.strategy=ssp"])
    assert cfg.sync.strategy == "ssp" and cfg.sync.options.staleness == 1
    cfg = config.load(p)
    assert cfg.sync.strategy == "bmuf" and cfg.sync.options.period == 3
    with pytest.raises(UserError, match=r"unknown key sync\.ssp\.nope"):  # not selected, still validated
        config.load(p, ["sync.ssp.nope=1"])
    with pytest.raises(UserError, match=r"sync\.ssp\.staleness: expected a value >= 0"):
        config.load(p, ["sync.ssp.staleness=-1"])


def test_every_strategy_has_defaults():
    for name, cls in REGISTRY.items():
        cfg = config.from_dict({"sync": {"strategy": name}})
        assert cfg.sync.options == cls.Options()
        assert config.from_dict(cfg.to_dict()) == cfg


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
    ("[sync]\nstrategy = 'gossip'\n", [], "job.toml: sync.strategy: unknown strategy 'gossip'"),
    ("[sync]\nstrategy = 3\n", [], "sync.strategy: expected a string"),
    ("[sync]\nnope = 3\n", [], "unknown key sync.nope"),
    ("[sync]\nbmuf = 3\n", [], "sync.bmuf: expected a table [sync.bmuf]"),
    ("[sync.bmuf]\nperiod = 0\n", [], "sync.bmuf.period: expected a value > 0, got 0"),
    ("[sync.allreduce]\noverlap = 'eager'\n", [], "sync.allreduce.overlap: expected one of"),
    ("", ["sync.easgd.period=x"], "(with --set): sync.easgd.period: expected an integer"),
    ("", ["sync.ssp.staleness=1.5"], "sync.ssp.staleness: expected an integer"),
    ("[train]\nepochs = 3\n", ["train.epochs.x=1"], "train.epochs is not a table"),
    ("[optim]\nlr = nan\n", [], "optim.lr: expected a finite number, got nan"),
    ("", ["optim.lr=inf"], "optim.lr: expected a finite number, got inf"),
    ("", ["train.watchdog_s=nan"], "train.watchdog_s: expected a finite number"),
    ("", ["optim.warmup_epochs=inf"], "optim.warmup_epochs: expected a finite number"),
    ("[sync]\nstrategy = 'easgd'\n[sync.easgd]\nbeta = inf\n", [], "sync.easgd.beta: expected a finite number"),
    ("[model]\ndropout = 1.5\n", [], "model.dropout: expected a value < 1.0"),
    ("[train]\nseed = 9223372036854775807\n", [], "train.seed: expected a value <= 4294967295"),
    ("[train]\nepochs = 1000000000000\n", [], "train.epochs: expected a value <= 1000000"),
    ("[sync]\nstrategy = 'ssp'\n[sync.ssp]\nstaleness = 1000000\n", [], "sync.ssp.staleness: expected a value <= 1000"),
    ("[output]\ndir = 'runs/{foo}'\n", [], "output.dir: 'runs/{foo}' is not a valid folder pattern"),
    ("[output]\ndir = 'runs/{name'\n", [], "output.dir: 'runs/{name' is not a valid folder pattern"),
    ("[train]\non_nonfinite = 'ignore'\n", [], "train.on_nonfinite: expected one of 'stop', 'skip'"),
    ("[train]\nprecision = 'fp16'\n", [], "train.precision = 'fp16' needs train.device = 'cuda'"),
    ("[train]\nprecision = 'fp16'\ndevice = 'cuda'\n[sync]\nstrategy = 'async'\n", [],
     "'async' applies the update in the parameter store, which cannot unscale fp16"),
    ("[train]\nprecision = 'fp8'\n", [], "train.precision: expected one of"),
    ("[train]\naccumulate = 0\n", [], "train.accumulate: expected a value > 0"),
    ("[sync]\nstrategy = 'ps_sync'\n[optim]\nclip_norm = 1.0\n", [], "optim.clip_norm: 'ps_sync' applies the update"),
    ("[model]\nargs = 3\n", [], "model.args: expected a table"),
])
def test_bad_config_names_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as e:
        config.load(write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# (strategy, old flat key, value) -> the new key the error names
MOVED = [
    ("allreduce", "bucket_mb", 2, "sync.allreduce.bucket_mb"),
    ("allreduce", "first_bucket_mb", 1, "sync.allreduce.first_bucket_mb"),
    ("allreduce", "overlap", "'none'", "sync.allreduce.overlap"),
    ("ssp", "staleness", 2, "sync.ssp.staleness"),
    ("async", "dc_lambda", 0.04, "sync.async.dc_lambda"),
    ("post_local_sgd", "local_start", 10, "sync.post_local_sgd.local_start"),
    ("bmuf", "bmuf_momentum", 0.5, "sync.bmuf.momentum"),
    ("bmuf", "bmuf_lr", 1.0, "sync.bmuf.lr"),
    ("bmuf", "bmuf_nesterov", "false", "sync.bmuf.nesterov"),
    ("easgd", "easgd_beta", 0.9, "sync.easgd.beta"),
    ("easgd", "easgd_alpha", 0.1, "sync.easgd.alpha"),
    ("local_sgd", "period", 3, "sync.local_sgd.period"),
    ("bmuf", "period", 3, "sync.bmuf.period"),
    ("easgd_async", "period", 3, "sync.easgd_async.period"),
    ("ps_sync", "servers", 1, "sync.ps_sync.servers"),
    ("async", "servers", 1, "sync.async.servers"),
    ("ssp", "timeout_s", 5, "sync.ssp.timeout_s"),
    ("easgd_async", "timeout_s", 5, "sync.easgd_async.timeout_s"),
]


@pytest.mark.parametrize("strategy, key, value, new", MOVED, ids=[f"{s}-{k}" for s, k, _, _ in MOVED])
def test_old_flat_sync_keys_name_the_new_key(tmp_path, strategy, key, value, new):
    in_file = write(tmp_path, f'[sync]\nstrategy = "{strategy}"\n{key} = {value}\n')
    for path, overrides in ((in_file, []), (write(tmp_path, "", "empty.toml"), [f"sync.strategy={strategy}",
                                                                 f"sync.{key}={value}"])):
        with pytest.raises(UserError) as e:
            config.load(path, overrides)
        msg = str(e.value)
        assert f"sync.{key} is now {new}" in msg and "\n" not in msg, msg
        assert msg.startswith(str(path)), msg
    # and the new key works
    new_key = new.split(".", 2)[2]
    cfg = config.load(write(tmp_path, f'[sync]\nstrategy = "{strategy}"\n[sync.{strategy}]\n{new_key} = {value}\n'))
    assert getattr(cfg.sync.options, new_key) is not None


def test_old_key_a_strategy_does_not_take(tmp_path):
    p = write(tmp_path, '[sync]\nstrategy = "allreduce"\nperiod = 3\n')
    with pytest.raises(UserError) as e:
        config.load(p)
    msg = str(e.value)
    assert "sync.period is now sync.STRATEGY.period for bmuf, easgd, easgd_async, local_sgd, post_local_sgd" in msg
    assert "(allreduce takes no period)" in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["[comm]\ncuda_path = 'staged'\n", ""])
def test_comm_section_is_gone(tmp_path, text):
    overrides = [] if text else ["comm.cuda_path=staged"]
    with pytest.raises(UserError, match=r"\[comm\] cuda_path is now sync\.allreduce\.cuda_path"):
        config.load(write(tmp_path, text), overrides)
    cfg = config.load(write(tmp_path, "[sync.allreduce]\ncuda_path = 'staged'\n"))
    assert cfg.sync.options.cuda_path == "staged"


@pytest.mark.parametrize("raw, message", [
    ({"data": {"assign": "dynamic", "mode": "replicated"}},
     "data.assign = 'dynamic' needs a strategy that lets ranks run different numbers of steps"),
    ({"data": {"assign": "dynamic", "mode": "replicated"}, "sync": {"strategy": "ssp"}},
     "data.assign = 'dynamic' needs a strategy"),
    ({"data": {"assign": "dynamic"}, "sync": {"strategy": "async"}},
     "data.assign = 'dynamic' needs data.mode = 'replicated'"),
    ({"data": {"shuffle": "global"}}, "data.shuffle = 'global' needs data.mode = 'replicated'"),
])
def test_cross_section_checks(raw, message):
    with pytest.raises(UserError) as e:
        config.from_dict(raw, "<test>")
    msg = str(e.value)
    assert msg.startswith("<test>: ") and message in msg and "\n" not in msg, msg
    if raw.get("sync", {}).get("strategy", "allreduce") != "async" and "strategy" in message:
        assert "async" in msg and repr(raw.get("sync", {}).get("strategy", "allreduce")) in msg, msg


def test_cross_section_checks_pass():
    cfg = config.from_dict({"data": {"assign": "dynamic", "mode": "replicated"}, "sync": {"strategy": "async"}})
    assert cfg.data.assign == "dynamic"
    assert config.from_dict({"data": {"shuffle": "global", "mode": "replicated"}}).data.shuffle == "global"


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="no such job file"):
        config.load(tmp_path / "nope.toml")


def test_job_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "job.toml"
    p.write_bytes(b"[train]\nepochs = 3 # \xff\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        config.load(p)
