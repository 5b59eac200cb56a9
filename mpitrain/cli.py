"""Command line: `python -m mpitrain {train,data,bench} ...` (every rank runs the same)."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__
from .comm.world import LAUNCH
from .errors import EXIT_OOM, EXIT_USAGE, AgreedError, UserError, out_of_memory
from .faults import EXIT_DIVERGED, EXIT_STOPPED, Stopped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpitrain",
        description="Data-parallel PyTorch training over MPI. Launch every rank with: "
                    f"{LAUNCH} train JOB.toml",
        epilog=f"Exit codes: 0 ok, {EXIT_USAGE} bad input (one line on stderr), 3 watchdog: no progress, "
               f"{EXIT_DIVERGED} non-finite loss (train.on_nonfinite = 'stop'), {EXIT_STOPPED} stopped by "
               "SIGTERM/SIGUSR1/SIGINT after writing a checkpoint (rerun to resume), 1 internal error.")
    p.add_argument("--version", action="version", version=f"mpitrain {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a job (TOML file in jobs/)")
    t.add_argument("job", help="job file, e.g. jobs/digits.toml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.epochs=2")

    c = sub.add_parser("config", help="print the resolved config of a job (validates it), or with --keys the "
                                      "reference of every key")
    c.add_argument("job", nargs="?", help="job file (not with --keys)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--keys", action="store_true",
                   help="print a Markdown reference of every section and key (type, default, allowed values, "
                        "help), generated from the options' own metadata")
    c.add_argument("--write", metavar="FILE",
                   help="with --keys: replace the generated block of FILE (docs/configuration.md) instead of "
                        "printing")

    cp = sub.add_parser("compare", help="train a job under several strategies; table + plots")
    cp.add_argument("spec", help="comparison file, e.g. jobs/compare-digits.toml")
    rp = sub.add_parser("report", help="rebuild the comparison table and plots from run folders")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", default="runs/report", help="folder for table.md/.csv and the PNGs")
    rp.add_argument("--metric", default="test_acc", help="test_acc (default) | test_loss | test_ppl | test_mse")
    rp.add_argument("--target", type=float, default=0.97,
                    help="the metric's goal for time-to-target (accuracy: at least; loss, ppl, mse: at most)")
    rp.add_argument("--title", default="")

    ip = sub.add_parser("inspect", help="what a checkpoint holds and whether its checksums match")
    ip.add_argument("checkpoint")

    xp = sub.add_parser("export", help="a checkpoint's model as a safetensors file (mpitrain.load_model reads it)")
    xp.add_argument("source", help="a checkpoint, or a run folder (its newest valid checkpoint)")
    xp.add_argument("--out", required=True, help="the .safetensors file to write")
    xp.add_argument("--force", action="store_true", help="replace --out if it exists")
    ep = sub.add_parser("evaluate", help="a checkpoint's model on a split: test_loss, test_acc / mse / ppl; "
                                         "per-class table and confusion matrix (run under mpiexec: any world size)")
    ep.add_argument("source", help="a checkpoint, or a run folder (its newest valid checkpoint)")
    ep.add_argument("--data", default="", help="another HDF5 file (default: the job's data.path)")
    ep.add_argument("--split", default="test", help="the HDF5 group to evaluate (default: test)")
    ep.add_argument("--png", default="", help="write the confusion matrix here (classification)")
    ep.add_argument("--force", action="store_true", help="replace --png if it exists")
    sp = sub.add_parser("sample", help="text from a language model's checkpoint (only the text on stdout)")
    sp.add_argument("source", help="a checkpoint, or a run folder (its newest valid checkpoint)")
    sp.add_argument("--prompt", default="", help="text to continue (default: a new line)")
    sp.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    sp.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative (default 1)")
    sp.add_argument("--top-k", type=int, default=0, help="draw from the k most likely tokens only (0: all)")
    sp.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")

    d = sub.add_parser("data", help="prepare data sets as HDF5").add_subparsers(dest="what", required=True)
    dg = d.add_parser("digits", help="scikit-learn's bundled UCI digits -> data/digits/digits.h5")
    dg.add_argument("--out", default="data/digits/digits.h5")
    dg.add_argument("--test-fraction", type=float, default=0.2)
    dg.add_argument("--seed", type=int, default=0)
    df = d.add_parser("fashion-mnist", help="Fashion-MNIST (apt: dataset-fashion-mnist) -> data/fashion-mnist/fashion.h5")
    df.add_argument("--from", dest="source", default="/usr/share/datasets/fashion-mnist",
                    help="folder with the four upstream IDX files (.gz or not)")
    df.add_argument("--out", default="data/fashion-mnist/fashion.h5")
    ds = d.add_parser("synthetic", help="teacher-network data of any size, written in parallel (mpio)")
    ds.add_argument("--out", required=True)
    ds.add_argument("--samples", type=int, default=100_000)
    ds.add_argument("--test-samples", type=int, default=10_000)
    ds.add_argument("--features", type=int, default=784)
    ds.add_argument("--classes", type=int, default=10)
    ds.add_argument("--hidden", type=int, default=64)
    ds.add_argument("--seed", type=int, default=0)
    dc = d.add_parser("convert", help="a .npz with input and target arrays -> HDF5 (streamed in chunks)")
    dc.add_argument("src")
    dc.add_argument("out")
    dc.add_argument("--x", default="x", help="name of the input array in the .npz")
    dc.add_argument("--y", default="y", help="name of the target array: integer labels (N,) or float targets "
                                             "(N,) / (N, k) for regression")
    dc.add_argument("--test-fraction", type=float, default=0.0, help="a random test split of this fraction")
    dc.add_argument("--seed", type=int, default=0, help="of the --test-fraction permutation")
    dc.add_argument("--test", dest="test_src", metavar="OTHER.npz",
                    help="official test split: the arrays --x/--y of another .npz (rows kept in order)")
    dc.add_argument("--x-test", metavar="NAME", help="official test split: its input array in this .npz")
    dc.add_argument("--y-test", metavar="NAME", help="official test split: its target array in this .npz")
    dc.add_argument("--scale", type=float, metavar="S",
                    help="the attribute `scale` of x, which the loader multiplies by; integer inputs (e.g. uint8) "
                         "are then stored as they are")
    dt = d.add_parser("text", help="a text file -> a token stream (train/tokens, test/tokens) for language models")
    dt.add_argument("src", metavar="FILE", help="the text file (UTF-8 for --level char)")
    dt.add_argument("--out", required=True, help="the HDF5 file to write")
    dt.add_argument("--level", default="char", choices=("char", "byte"),
                    help="char: the file's distinct characters are the vocabulary; byte: the 256 byte values")
    dt.add_argument("--test-fraction", type=float, default=0.1,
                    help="the last fraction of the stream is the test split (0: none)")

    b = sub.add_parser("bench", help="benchmarks that print ratios against an in-run baseline")
    bs = b.add_subparsers(dest="what", required=True)
    bstep = bs.add_parser("step", help="ms/step: compute-only, mpitrain sync, DDP-gloo, naive allreduce")
    bstep.add_argument("--hidden", default="1024,1024,1024,1024", help="MLP widths (comma-separated)")
    bstep.add_argument("--features", type=int, default=784)
    bstep.add_argument("--batch", type=int, default=64, help="per-rank batch")
    bstep.add_argument("--steps", type=int, default=30)
    bstep.add_argument("--warmup", type=int, default=5)
    bstep.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    bstep.add_argument("--bucket-mb", type=float, default=25.0)
    bstep.add_argument("--no-ddp", action="store_true", help="skip the torch DDP-gloo baseline")
    bstep.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the model runs")
    ba = bs.add_parser("allreduce", help="algbw/busbw of raw MPI.Allreduce vs the bucketed path")
    ba.add_argument("--sizes", default="4K,64K,1M,4M,16M,64M", help="message sizes in bytes (K/M suffixes)")
    ba.add_argument("--iters", type=int, default=10)
    ba.add_argument("--bucket-mb", type=float, default=25.0)
    ba.add_argument("--overlap", default="auto", choices=("auto", "thread", "nonblocking", "none"))
    ba.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the buffers live")
    bm = bs.add_parser("model", help="fit alpha/beta and compute time; predicted vs measured step time")
    bm.add_argument("--job", default="jobs/digits.toml")
    bm.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    bm.add_argument("--sizes", default="64K,256K,1M,4M,16M", help="allreduce sizes for the alpha/beta fit")
    bm.add_argument("--iters", type=int, default=10)
    bm.add_argument("--steps", type=int, default=20)
    bm.add_argument("--repeats", type=int, default=3)
    bm.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    bm.add_argument("--big-params", type=int, default=100_000_000, help="model size for the extrapolation")
    bmem = bs.add_parser("memory", help="bytes of parameters, gradients, optimizer state and peak RSS per rank: "
                                        "allreduce vs zero stage 1 and 2, next to the formulas")
    bmem.add_argument("--job", default="jobs/shakespeare.toml")
    bmem.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    bmem.add_argument("--steps", type=int, default=3, help="steps per variant before counting")
    bmem.add_argument("--variants", default="", help="comma-separated list of allreduce, zero-1, zero-2 (the "
                                                     "default), pipeline-2, pipeline-4, tensor-2, tensor-4")
    bp = bs.add_parser("pipeline", help="a GPT in P pipeline stages x D replicas: ms/step, samples/s, bubble, "
                                        "micro-batches held, per layout, schedule and micro-batch count")
    bp.add_argument("--stages", default="1,2,4", help="P values (those dividing the world size are run)")
    bp.add_argument("--schedules", default="gpipe,1f1b")
    bp.add_argument("--micro", default="4,8,16", help="micro-batches per step")
    bp.add_argument("--layers", type=int, default=8)
    bp.add_argument("--width", type=int, default=256)
    bp.add_argument("--heads", type=int, default=8)
    bp.add_argument("--seq", type=int, default=64)
    bp.add_argument("--vocab", type=int, default=65)
    bp.add_argument("--batch", type=int, default=32, help="token windows per replica per step")
    bp.add_argument("--steps", type=int, default=3)
    bp.add_argument("--repeats", type=int, default=3)
    bg = bs.add_parser("straggler", help="one slow rank: throughput and time to accuracy per strategy")
    bg.add_argument("--spec", default="jobs/straggler-digits.toml",
                    help="comparison file: base job, target, [[run]] tables (the first is the baseline)")
    bg.add_argument("--rank", type=int, default=1, help="the slow rank")
    bg.add_argument("--factor", type=float, default=2.0, help="its steps take factor x its compute time")
    bg.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    be = bs.add_parser("e2e", help="a job's own training step vs one process on all cores and torch DDP-gloo")
    be.add_argument("--job", required=True, help="job file, e.g. jobs/fashion.toml (its model, data, optimizer, "
                                                 "batch size and strategy)")
    be.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key of the job (repeatable)")
    be.add_argument("--steps", type=int, default=20, help="timed steps per round")
    be.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    be.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    be.add_argument("--precision", default="fp32,bf16",
                    help="comma-separated: fp32, bf16 (autocast of forward and loss); every variant runs each")
    be.add_argument("--no-ddp", action="store_true", help="skip the torch DDP-gloo baseline")
    be.add_argument("--no-single", action="store_true", help="skip the one-process baseline")
    return p


def _run(args, world, log) -> None:
    if args.cmd == "config" and (args.keys or args.write):
        from . import docs

        if args.job or args.overrides:
            raise AgreedError("config --keys: the reference of every key takes no job file and no --set")
        msg = world.on_root(docs.write, args.write) if args.write else world.on_root(docs.reference)
        if world.is_root:
            print(msg, end="")
        return
    if args.cmd == "config" and not args.job:
        raise AgreedError("config: give a job file (or --keys for the reference of every key)")
    if args.cmd in ("train", "config"):
        from . import config

        cfg = world.agree(config.load, args.job, args.overrides)
        if args.cmd == "config":
            if world.is_root:
                print(cfg.dumps(), end="")
            return
        from .train import train

        train(cfg, world, log)
    elif args.cmd == "data":
        from .data import prepare

        if args.what == "synthetic":
            msg = world.agree(prepare.synthetic, world, args.out, args.samples, args.test_samples, args.features,
                                    args.classes, args.hidden, args.seed)
        else:  # small, serial writers
            msg = world.on_root(_serial_data, args, prepare)
        if world.is_root:
            print(msg)
    elif args.cmd == "compare":
        from . import compare, report

        spec = world.agree(compare.load_compare, args.spec)
        cfgs = compare.train_each(spec, world, log)
        if world.is_root:
            print(report.report([str(c.run_dir) for c in cfgs], str(spec.out), spec.target,
                                f"{spec.title}: {world.size} ranks", spec.metric))
    elif args.cmd == "report":
        from . import report

        msg = world.on_root(report.report, args.runs, args.out, args.target, args.title, args.metric)
        if world.is_root:
            print(msg)
    elif args.cmd == "inspect":
        from . import checkpoint

        msg = world.on_root(checkpoint.describe, args.checkpoint)
        if world.is_root:
            print(msg)
    elif args.cmd == "evaluate":
        from . import evaluation

        evaluation.run(args, world, log)
    elif args.cmd in ("export", "sample"):
        from . import export

        if args.cmd == "export":
            msg = world.on_root(export.export, args.source, args.out, args.force)
        else:
            msg = world.on_root(export.sample, args.source, args.prompt, args.tokens, args.temperature, args.top_k,
                                args.seed)
        if world.is_root:
            print(msg)  # (sample: the text alone; logs go to stderr)
    elif args.cmd == "bench":
        from . import bench

        getattr(bench, args.what)(args, world, log)


def _startup_watchdog_s() -> float:
    """MPITRAIN_WATCHDOG_S (default 600): the watchdog's limit until a job file sets its own."""
    from .faults import env_timeout

    try:
        return env_timeout()
    except UserError as e:
        print(f"mpitrain: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _serial_data(args, prepare):
    if args.what == "digits":
        return prepare.digits(args.out, args.test_fraction, args.seed)
    if args.what == "fashion-mnist":
        from .data import fashion

        return fashion.prepare(args.out, args.source)
    if args.what == "text":
        from .data import text

        return text.prepare(args.src, args.out, args.level, args.test_fraction)
    return prepare.convert(args.src, args.out, args.x, args.y, args.test_fraction, args.seed, test_src=args.test_src,
                           x_test_key=args.x_test, y_test_key=args.y_test, scale=args.scale)


def main(argv=None) -> None:
    from .faults import Watchdog, stop_flag

    stop_flag()  # catch SIGTERM/SIGUSR1/SIGINT from the very start
    args = _parser().parse_args(argv)
    from .comm import World
    from .comm.world import exit_cleanly

    # watched from the first collective on; train.watchdog_s replaces the start-up limit
    dog = Watchdog(_startup_watchdog_s())
    world = World.create()
    dog.attach(world)
    log = world.logger()

    def leave(code: int) -> None:  # every rank leaves the same way: no watchdog thread in Finalize
        dog.stop(leaving=True)
        exit_cleanly(code)
    try:
        _run(args, world, log)
        dog.close(leaving=True)  # then MPI_Finalize (at exit), still under the C-level backstop
    except Stopped as e:  # every rank agreed to stop and the checkpoint is written
        if world.is_root:
            log.warning(str(e))
        leave(EXIT_STOPPED)
    except UserError as e:
        if args.debug:
            raise
        if e.agreed:  # every rank has it: rank 0 prints, all exit cleanly
            if world.is_root:
                print(f"mpitrain: error: {e}", file=sys.stderr, flush=True)
            leave(e.exit_code)
        print(f"mpitrain: error (rank {world.rank}): {e}", file=sys.stderr, flush=True)
        world.abort(e.exit_code)  # only this rank knows: end the others too
    except (MemoryError, RuntimeError) as e:
        line = out_of_memory(e)
        if args.debug or line is None:
            raise
        print(f"mpitrain: error (rank {world.rank}): {line}", file=sys.stderr, flush=True)
        world.abort(EXIT_OOM)  # the others may wait in a collective: end them too
