"""After training: `mpitrain export` -> safetensors -> `mpitrain.load_model` in a fresh
process without MPI gives the checkpoint's model; `mpitrain sample` is deterministic for
a seed; bad input is one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpitrain import checkpoint, export
from mpitrain.errors import UserError
from mpitrain.train import train

pytestmark = pytest.mark.mpi

FRESH = r"""
import json, sys
import numpy as np, torch
import mpitrain
torch.set_num_threads(int(sys.argv[3]))  # (the parent's: the same kernels, the same rounding)
model = mpitrain.load_model(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
print(json.dumps(model(x).detach().double().numpy().tolist()))
"""


@pytest.fixture(scope="module")
def chars_h5(world, tmp_path_factory):
    """A char-level token file as `mpitrain data text` makes it (vocab and level attributes)."""
    import h5py

    path = None
    if world.is_root:
        path = tmp_path_factory.mktemp("chars") / "chars.h5"
        vocab = "\n abcdefgh"
        rng = np.random.default_rng(5)
        with h5py.File(path, "w") as f:
            f.attrs.update(vocab_size=len(vocab), level="char", vocab=vocab)
            f["train/tokens"] = rng.integers(0, len(vocab), 4000).astype(np.uint8)
            f["test/tokens"] = rng.integers(0, len(vocab), 400).astype(np.uint8)
    return world.bcast(path)


def _on_root(world, fn):
    """fn() on rank 0; its assertion failure (or error) is agreed, so no rank waits."""
    err = None
    if world.is_root:
        try:
            fn()
        except AssertionError as e:
            err = f"{e}"
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
    err = world.bcast(err)
    assert err is None, err


def _fresh_outputs(model_file, x, tmp):
    np.save(tmp / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}  # not a rank
    r = subprocess.run([sys.executable, "-c", FRESH, str(model_file), str(tmp / "x.npy"), str(torch.get_num_threads())],
                       capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.array(json.loads(r.stdout))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [1, 2])
def test_an_exported_model_loads_in_plain_torch_with_the_same_outputs(world, shared_tmp, digits_h5, make_cfg,
                                                                       stages):
    if world.size % stages:
        pytest.skip(f"{stages} pipeline stages need an even world size")
    run = shared_tmp / "run"
    cfg = make_cfg(run, digits_h5, model={"name": "mlp", "hidden": [16, 16]}, data={"mode": "replicated"},
                   train={"max_steps": 4, "batch_size": 8}, parallel={"pipeline_stages": stages})
    train(cfg, world, world.logger())

    def check():
        out = shared_tmp / "model.safetensors"
        msg = export.export(str(run), str(out))
        assert "parameters of mpitrain.models:mlp" in msg and "(step 4)" in msg, msg
        model, _, _ = export.from_checkpoint(str(run))  # the checkpoint's whole (unsplit) model
        x = np.random.default_rng(0).standard_normal((5, 8, 8)).astype(np.float32)
        want = model(torch.from_numpy(x)).detach().double().numpy()
        got = _fresh_outputs(out, x, shared_tmp)
        assert np.array_equal(got, want), np.abs(got - want).max()
        with pytest.raises(UserError, match="exists"):
            export.export(str(run), str(out))
        export.export(str(run), str(out), force=True)
    _on_root(world, check)


@pytest.mark.timeout(240)
def test_sampling_is_deterministic_for_a_seed(world, shared_tmp, chars_h5, make_cfg):
    run = shared_tmp / "lm"
    cfg = make_cfg(run, chars_h5, model={"name": "gpt", "args": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
                   data={"seq_len": 16, "mode": "replicated"}, train={"max_steps": 3, "batch_size": 4})
    train(cfg, world, world.logger())

    def check():
        a = export.sample(str(run), "abc", tokens=40, temperature=0.8, top_k=5, seed=1)
        assert a == export.sample(str(run), "abc", tokens=40, temperature=0.8, top_k=5, seed=1)
        assert a != export.sample(str(run), "abc", tokens=40, temperature=0.8, top_k=5, seed=2)
        assert a.startswith("abc") and len(a) == 43 and set(a) <= set("\n abcdefgh")
        for kwargs, words in (({"prompt": "xyz"}, "outside the model's vocabulary"), ({"tokens": -1}, "--tokens"),
                              ({"tokens": 10**9}, "--tokens"), ({"temperature": 0.0}, "--temperature"),
                              ({"top_k": -2}, "--top-k")):
            with pytest.raises(UserError, match=words) as e:
                export.sample(str(run), **kwargs)
            assert "\n" not in str(e.value)
    _on_root(world, check)


def test_what_cannot_be_exported_or_sampled_is_one_line(world, shared_tmp, digits_h5, make_cfg):
    import mpitrain

    run = shared_tmp / "cls"
    train(make_cfg(run, digits_h5, train={"max_steps": 1}), world, world.logger())
    model = torch.nn.Linear(3, 2)
    model, opt = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world)
    api = str(shared_tmp / "api.h5")
    mpitrain.save(api, model, opt)
    opt.close()

    def check():
        with pytest.raises(UserError, match="language model"):
            export.sample(str(run))
        with pytest.raises(UserError, match="does not record how to rebuild"):
            export.export(api, str(shared_tmp / "m.safetensors"))
        with pytest.raises(UserError, match="no such checkpoint"):
            export.export(str(shared_tmp / "nope"), str(shared_tmp / "m.safetensors"))
        bad = shared_tmp / "bad.safetensors"
        bad.write_bytes(b"not a model")
        with pytest.raises(UserError, match="not a safetensors file"):
            mpitrain.load_model(str(bad))
        assert checkpoint.list_checkpoints(run)
    _on_root(world, check)


@pytest.mark.timeout(240)
def test_evaluate_gives_what_training_logged(world, shared_tmp, digits_h5, chars_h5, make_cfg, capfd):
    """`mpitrain evaluate` of the final checkpoint at the training's world size: the
    metrics row's test_loss and test_acc exactly; a PNG; another vocabulary is one line."""
    import argparse

    from mpitrain import evaluation
    from mpitrain.errors import AgreedError

    run = shared_tmp / "ev"
    train(make_cfg(run, digits_h5, train={"max_steps": 6}), world, world.logger())
    png = shared_tmp / "cm.png"
    args = argparse.Namespace(source=str(run), data="", split="test", png=str(png), force=False)
    capfd.readouterr()
    evaluation.run(args, world, world.logger())
    out = [ln for ln in capfd.readouterr().out.splitlines() if ln.strip()]

    def check():
        got = json.loads(out[0])
        logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert got["test_loss"] == logged["test_loss"] and got["test_acc"] == logged["test_acc"], (got, logged)
        assert got["step"] == 6 and out[1].split() == ["class", "samples", "recall", "precision"]
        assert png.stat().st_size > 1000
    _on_root(world, check)
    with pytest.raises((UserError, AgreedError), match="exists"):
        evaluation.run(args, world, world.logger())
    lm = shared_tmp / "lm2"
    train(make_cfg(lm, chars_h5, model={"name": "gpt", "args": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
                   data={"seq_len": 8, "mode": "replicated"}, train={"max_steps": 1, "batch_size": 4}),
          world, world.logger())
    other = argparse.Namespace(source=str(lm), data=str(digits_h5), split="test", png="", force=False)
    with pytest.raises(AgreedError) as e:
        evaluation.run(other, world, world.logger())
    assert "\n" not in str(e.value)
    nosplit = argparse.Namespace(source=str(run), data="", split="nope", png="", force=False)
    with pytest.raises(AgreedError, match="nope"):
        evaluation.run(nosplit, world, world.logger())
