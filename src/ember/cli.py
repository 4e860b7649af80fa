"""The ``ember`` command line: parse arguments, call the library, print results.

Every command is a library function; this file only translates arguments.
A user-fixable problem (``EmberError``) is printed as one paragraph and
exits with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from ember import __version__
from ember.errors import EmberError

# Commands whose issue has not landed yet: name → (what it will do, issue).
NOT_YET: dict[str, tuple[str, int]] = {}


def cmd_train(args: argparse.Namespace) -> int:
    from ember.config import load_recipe
    from ember.training.loop import finished_run, train

    if args.resume and not args.run_dir:
        raise EmberError("--resume needs --run-dir: name the run directory to continue (it holds checkpoints/).")
    recipe_path = args.recipe
    if recipe_path is None:
        if not args.resume:
            raise EmberError(
                "ember train needs a RECIPE (e.g. recipes/gpt-tiny.yaml), or --run-dir RUN --resume auto to continue RUN with its own recipe."
            )
        recipe_path = Path(args.run_dir) / "recipe.yaml"
    recipe = load_recipe(recipe_path, args.set)  # a bad recipe fails here, before any process starts
    cluster = _cluster_job(args)  # under SLURM, Kubeflow or MPI: this process is a rank, or starts them
    run_dir = _job_run_dir(args, Path(recipe_path).stem)
    # A finished run resumed with --nproc is said at once, before any process or tracker starts.
    result = finished_run(run_dir, recipe) if args.resume == "auto" and _wants_launch(args) else None
    if result is None:
        if cluster is not None and cluster.agents:
            return _launch_on_cluster(cluster, args, run_dir)
        if _wants_launch(args):
            return _relaunch_job(args, run_dir)
        result = train(recipe, run_dir=run_dir, resume=args.resume)
    if not _is_main_rank():
        return 0  # rank 0 reports for the job
    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"done: step {result.step}{' (early stop)' if result.stopped_early else ''}  val {shown}")
    tracked = "".join(
        f", {TRACKER_FILES[t]}"
        for t in recipe.train.trackers
        if t in TRACKER_FILES and (t != "mlflow" or not os.environ.get("MLFLOW_TRACKING_URI"))
    )
    print(f"run saved in {result.run_dir}  (model.safetensors, metrics.jsonl, checkpoints/{tracked})")
    return 0


# What each built-in tracker writes in the run (a tracker registered in Python writes where it says).
TRACKER_FILES = {"tensorboard": "tb/", "mlflow": "mlflow.db", "wandb": "wandb/"}


def _is_main_rank() -> bool:
    """True in a plain process and in rank 0 of a --nproc (torchrun) job: the one that prints for the job."""
    from ember.training.distributed import launched_rank

    return launched_rank() == 0


def _job_run_dir(args: argparse.Namespace, default_name: str) -> Path:
    """The directory every process of this job writes to: --run-dir, or a new default one."""
    from ember.runs import default_run_dir
    from ember.training.distributed import launched_world_size

    if launched_world_size() > 1 and not args.run_dir:
        raise EmberError(
            "Started as one of several processes (torchrun, SLURM, MPI), give --run-dir: every process must write to the same run directory."
        )
    return Path(args.run_dir) if args.run_dir else default_run_dir(default_name)


def _wants_launch(args: argparse.Namespace) -> bool:
    """--nproc given to a plain (not yet torchrun-started) process."""
    from ember.training.distributed import launched_world_size

    return args.nproc is not None and launched_world_size() == 1


def _cluster_job(args: argparse.Namespace):
    """The scheduler's job this process is part of (``ember.training.cluster``), said in one line; a
    rank the scheduler started gets its RANK, WORLD_SIZE and MASTER_ADDR here. --nproc sets the
    processes per node; EMBER_NO_CLUSTER=1 ignores the scheduler."""
    import dataclasses

    from ember.training.cluster import NO_CLUSTER_ENV, announce, detect_cluster, single_process_job

    job = detect_cluster(os.environ, _local_gpus)
    if job is None:
        single = single_process_job(os.environ, _local_gpus)
        if single is not None and args.nproc is None:  # found, and nothing to do: said, so no one wonders
            announce(single, single=True)
        return None
    if args.nproc is not None and not job.agents:
        raise EmberError(
            f"--nproc {args.nproc}, but the scheduler started this process as one rank of {job.world_size} "
            f"({job.scheduler}). Drop --nproc, or set {NO_CLUSTER_ENV}=1 to run --nproc processes here alone."
        )
    if args.nproc is not None:
        job = dataclasses.replace(job, nproc_per_node=args.nproc)
    announce(job)  # one line per node
    os.environ.update(job.rank_env)
    return job


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _launch_on_cluster(job, args: argparse.Namespace, run_dir: Path) -> int:
    """Start this node's agent with the job's processes per node, meeting the other nodes' agents."""
    from ember.training.launcher import Nodes

    if job.nnodes > 1 and not args.run_dir:
        raise EmberError(
            f"ember train on {job.nnodes} nodes needs --run-dir on a filesystem every node shares: each "
            f"node's processes write checkpoints and read each other's."
        )
    endpoint = job.endpoint if job.nnodes > 1 else "localhost:0"  # one node: any free port
    nodes = Nodes(job.nnodes, job.node_rank, endpoint, f"{job.scheduler}-{job.run_id or job.endpoint}")
    return _relaunch(job.nproc_per_node, [] if args.run_dir else ["--run-dir", str(run_dir)], nodes)


def _relaunch_job(args: argparse.Namespace, run_dir: Path) -> int:
    """Re-run this command in ``--nproc`` processes (torch.distributed.run), all writing to ``run_dir``."""
    return _relaunch(args.nproc, [] if args.run_dir else ["--run-dir", str(run_dir)])  # one name for all processes


def _relaunch(nproc: int, extra: list[str], nodes=None) -> int:
    """Re-run this command line, less --nproc, plus ``extra``, in ``nproc`` processes (per node of ``nodes``)."""
    from ember.training.launcher import launch

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        argv.append(arg)
    return launch(nproc, argv + extra, nodes)


def cmd_eval(args: argparse.Namespace) -> int:
    from ember.eval.evaluate import evaluate, format_report

    if _wants_launch(args):
        return _relaunch(args.nproc, [])
    report = evaluate(
        args.run,
        split=args.split,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        beam=args.beam,
        decode_samples=args.decode_samples,
    )
    if _is_main_rank():
        print(format_report(report))
        print(f"written to {Path(args.run) / 'eval.json'}")
    return 0


def _fold_models_hint(recipe, run_dir: Path) -> str:
    """What to do with the fold models: ensemble them on the test split, which every fold holds out;
    without one (data.test_fraction 0), how to get one (each fold's val split trained the others)."""
    if recipe.data.name != "prepared" and recipe.data.test_fraction == 0:
        return (
            "to ensemble the fold models on held-out data, train with --set data.test_fraction=0.1 "
            f"(this recipe has no test split), then ember ensemble {run_dir}/fold_* --split test"
        )
    return f"the fold models: ember ensemble {run_dir}/fold_* --split test"


def cmd_cv(args: argparse.Namespace) -> int:
    from ember.config import load_recipe
    from ember.eval.crossval import cross_validate, format_cv

    recipe = load_recipe(args.recipe, args.set)
    run_dir = _job_run_dir(args, f"cv-{Path(args.recipe).stem}")
    if _wants_launch(args):
        return _relaunch_job(args, run_dir)
    report = cross_validate(recipe, folds=args.folds, run_dir=run_dir, stratified=args.stratified)
    if _is_main_rank():
        print(format_cv(report))
        print(f"written to {run_dir / 'cv.json'}; {_fold_models_hint(recipe, run_dir)}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from ember.eval.ensemble import ensemble, format_ensemble, report_path

    if _wants_launch(args):
        return _relaunch(args.nproc, [])
    report = ensemble(
        args.runs,
        method=args.method,
        split=args.split,
        batch_size=args.batch_size,
        out=args.out,
        max_batches=args.max_batches,
    )
    if _is_main_rank():
        print(format_ensemble(report))
        print(f"written to {report_path(args.runs, args.method, args.out)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ember.config import load_recipe
    from ember.search import format_tune, load_space, tune

    recipe, space = load_recipe(args.recipe, args.set), load_space(args.space)
    run_dir = _job_run_dir(args, f"tune-{Path(args.recipe).stem}")
    if _wants_launch(args):
        return _relaunch_job(args, run_dir)
    report = tune(
        recipe,
        space,
        sampler=args.sampler,
        trials=args.trials,
        run_dir=run_dir,
        storage=args.storage,
        study_name=args.study,
        pruner=args.pruner,
        seed=args.seed,
        startup_trials=args.startup_trials,
    )
    if _is_main_rank():
        print(format_tune(report))
        print(f"written to {run_dir / 'tune.json'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ember.compress.measure import format_table
    from ember.compress.quantize import quantize

    report = quantize(
        args.run,
        method=args.method,
        out=args.out,
        calibration_batches=args.calibration_batches,
        max_batches=args.max_batches,
    )
    print(format_table(report.rows))
    print(f"quantised run saved in {report.run} (model.safetensors, model.json); rows in each RUN/compress.json")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from ember.compress.measure import format_table
    from ember.compress.prune import prune

    report = prune(
        args.run,
        args.amount,
        method=args.method,
        iterative=args.iterative,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        overrides=args.set,
        out=args.out,
        max_batches=args.max_batches,
    )
    print(format_table(report.rows))
    print(f"pruned run saved in {report.run} (model.safetensors, model.json, prune.json; rounds/ holds each round)")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    from ember.continual import continue_training, format_report

    report = continue_training(
        args.run, args.data, replay=args.replay, ewc=args.ewc, overrides=args.set, out=args.run_dir, resume=args.resume
    )
    print(format_report(report))
    print(f"continued run saved in {report.run} (continual.json holds the table)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ember.compress.compare import compare
    from ember.compress.measure import format_table

    print(format_table(compare(args.runs, split=args.split, max_batches=args.max_batches)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ember.reporting import report

    print(f"report written to {report(args.runs, out=args.out, evaluate=not args.no_eval)}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from ember.eval.probe import format_probe, probe

    report = probe(args.run, split=args.split, baseline=not args.no_baseline)
    print(format_probe(report))
    print(f"written to {Path(args.run) / 'probe.json'}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from ember.compress.distill import distill
    from ember.config import load_recipe

    student = load_recipe(args.student, args.set)
    run_dir = _job_run_dir(args, f"distill-{Path(args.student).stem}")
    if _wants_launch(args):
        return _relaunch_job(args, run_dir)
    result = distill(
        args.teacher,
        student,
        temperature=args.temperature,
        alpha=args.alpha,
        run_dir=run_dir,
        resume=args.resume,
        hidden_weight=args.hidden_weight,
    )
    if _is_main_rank():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"done: step {result.step}  val {shown}\nstudent saved in {result.run_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ember.generation import generate

    text = generate(
        args.run,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.seed,
        beam=args.beam,
    )
    print(text)
    return 0


def data_config_for(recipe: str | None, sets: list[str], flags: dict):
    """The recipe's ``data`` section (or defaults), with ``--set`` and flag overrides on top."""
    from ember.config import apply_overrides, data_config_from_dict, read_recipe

    raw: dict = {}
    if recipe:
        whole = read_recipe(recipe)  # its base: chain merged
        if not isinstance(whole, dict) or not isinstance(whole.get("data") or {}, dict):
            raise EmberError(f"The recipe {recipe} must be a mapping with a data section (data: {{...}}).")
        raw = dict(whole.get("data") or {})
    raw = apply_overrides({"data": raw}, [f"data.{s}" for s in sets])["data"]
    raw.update({k: v for k, v in flags.items() if v is not None})
    raw.pop("name", None), raw.pop("path", None)  # which set to train on is not a prepare setting
    return data_config_from_dict(raw, source=recipe or "(data settings)")


def cmd_export(args: argparse.Namespace) -> int:
    from ember.interop.export import export_run

    result = export_run(args.run, args.out, fmt=args.format, merge=args.merge)
    print("\n".join(result.lines()))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from ember.data.prepare import prepare, summary_lines

    flags = {
        "vocab_size": args.vocab_size,
        "tokenizer_sample_mb": args.tokenizer_sample_mb,
        "tokenizer": args.tokenizer,
        "eos_token": args.eos_token,
        "text_field": args.field,
        "shard_size": args.shard_size,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "max_bytes": args.max_bytes,
        "label": args.label,
        "columns": [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns is not None else None,
        "target": args.target,
        "kind": args.kind,
        "source_field": args.source_field,
        "target_field": args.target_field,
        "captions": args.captions,
    }
    cfg = data_config_for(args.recipe, args.set, flags)
    result = prepare(args.sources, args.out, cfg, workers=args.workers, strict=args.strict, engine=args.engine)
    if result.reused_units or result.reused_shards:
        print(
            f"resumed: {result.reused_units} unit(s) and {result.reused_shards} shard(s) were already done",
            file=sys.stderr,
        )
    print("\n".join(summary_lines(result)))
    print(
        f"prepared {result.out_dir} in {result.seconds:.1f}s (manifest.json, stats.json); see `ember data inspect {result.out_dir}`"
    )
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    from ember.data.samples import SAMPLES, next_steps, write_sample

    out = Path(args.out) if args.out else Path(SAMPLES[args.kind][0])
    print("\n".join(next_steps(args.kind, out, write_sample(args.kind, out, seed=args.seed))))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from ember.data.inspect import describe

    print(describe(args.dir, sample=not args.no_sample))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from ember.data.inspect import verify_dir

    problems = verify_dir(args.dir)
    if problems:
        raise EmberError(
            f"{args.dir}: {len(problems)} file(s) do not match the manifest:\n  "
            + "\n  ".join(problems)
            + "\nRestore those files, or prepare the data again into a new directory."
        )
    print(f"{args.dir}: every shard matches its sha256")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ember.config import load_recipe
    from ember.plan import format_plan, plan

    print(
        format_plan(plan(load_recipe(args.recipe, args.set), gpus=args.gpus, gpu_memory=args.gpu_memory, gpu=args.gpu))
    )
    return 0


def _add_data_commands(sub) -> None:
    from ember.data.samples import SAMPLES

    data = sub.add_parser("data", help="prepare, inspect and verify data shards")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _add_prepare_command(dsub)
    p = dsub.add_parser("sample", help="write an example source of a kind, from data every machine has")
    p.add_argument("kind", choices=sorted(SAMPLES), help="the kind of source to write")
    p.add_argument("--out", help="where to write it (default: a file named for the sample, here)")
    p.add_argument("--seed", type=int, default=0, help="seed of a generated sample")
    p.set_defaults(func=cmd_data_sample)
    p = dsub.add_parser("inspect", help="summary of a prepared directory")
    p.add_argument("dir")
    p.add_argument("--no-sample", action="store_true", help="do not print the first training text")
    p.set_defaults(func=cmd_data_inspect)
    p = dsub.add_parser("verify", help="check every shard's sha256 against the manifest")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_verify)


ENGINE_HELP = (
    "where the work runs: local worker processes (default), or the tasks of a Ray cluster (RAY_ADDRESS, or one "
    "started with `ray start`; the ember[ray] extra; see docs/SCALING.md); the output is the same"
)


def _add_prepare_command(dsub) -> None:
    p = dsub.add_parser("prepare", help="clean, dedup, tokenise and shard SOURCEs into --out")
    p.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="file, directory, glob, or a bundled set: stdlib, digits"
    )
    p.add_argument("--out", required=True, help="directory to write shards, manifest.json and stats.json to")
    p.add_argument(
        "--workers", type=_count(1), default=1, help="worker processes (the output is the same for any number)"
    )
    p.add_argument("--engine", choices=("local", "ray"), default="local", help=ENGINE_HELP)
    p.add_argument("--recipe", help="take cleaning, dedup and tokenizer settings from this recipe's data section")
    _add_overrides(p, "override a data key, e.g. clean.max_chars=100000", metavar="KEY=VALUE")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        help="train the BPE on about this many MB of the training split (default: all of it; at corpus scale e.g. 1000)",
    )
    p.add_argument(
        "--tokenizer",
        help="bpe (train one, default), bytes, or any tokenizer.json to use (e.g. a Hugging Face model's)",
    )
    p.add_argument(
        "--eos-token", help="the given tokenizer's end-of-text token, when its special tokens do not name one"
    )
    p.add_argument("--field", help="JSONL field / Parquet or CSV column holding the text (default text)")
    p.add_argument("--shard-size", type=int, help="tokens (or images) per shard")
    p.add_argument("--val-fraction", type=float, help="share of documents (images) held out for validation")
    p.add_argument(
        "--test-fraction",
        type=float,
        help="share held out as a test split for `ember eval --split test` (default 0: none)",
    )
    p.add_argument("--max-bytes", type=int, help="read source files until this many bytes (0 = all)")
    p.add_argument(
        "--label",
        metavar="COLUMN",
        help="prepare a table (CSV, TSV, JSONL or Parquet rows) for classification (or regression, --target values): its label column",
    )
    p.add_argument("--columns", metavar="A,B,C", help="a table's feature columns (default: every column but --label)")
    p.add_argument(
        "--target",
        choices=("auto", "classes", "values"),
        help="a table's label: classes to classify (auto, the default: never guessed), or numeric values to "
        "regress (mse/mae/r2)",
    )
    p.add_argument(
        "--kind",
        "--task",
        dest="kind",
        choices=("auto", "text", "images", "table", "labelled-text", "pairs", "captions", "instruct"),
        help="what the sources hold (default auto: --captions → captions; --label → labelled-text when the rows "
        "have the --field column, else table; rows with the --source-field and --target-field → pairs; rows with "
        "prompt and response, or messages → instruct (loss on the responses only); else text or images by the files)",
    )
    p.add_argument("--source-field", help="pairs: the field holding each source text (default source)")
    p.add_argument("--target-field", help="pairs: the field holding each target text (default target)")
    p.add_argument("--captions", metavar="FILE", help="captions: a JSONL/CSV file mapping image files to captions")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    p.set_defaults(func=cmd_data_prepare)


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes (a missing or malformed argument) as one paragraph, exit 2,
    like every other ember error; its subcommand parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ember: error: {self.prog}: {message}. See `{self.prog} --help` for the arguments.\n")


def _count(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number of at least ``minimum`` (a count of batches, steps, a seed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            within = f"between {minimum} and {maximum}" if maximum is not None else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"must be {within}, got {value}")
        return value

    return parse


def _add_memory_check_flag(p: argparse.ArgumentParser) -> None:
    """For the commands that start training runs (read in ``main``)."""
    p.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start even when `ember plan` predicts the model will not fit in this device's free memory",
    )


_SEED = _count(0, 2**32 - 1)
_RECIPE_KEY = "SECTION.KEY=VALUE"


def _add_overrides(
    p: argparse.ArgumentParser, help: str | None = "override a recipe key (repeatable)", metavar: str = _RECIPE_KEY
) -> None:
    """``--set KEY=VALUE``, repeatable, collected into ``args.set`` (a list, empty by default)."""
    p.add_argument("--set", action="append", default=[], metavar=metavar, help=help)


def _add_nproc(p: argparse.ArgumentParser, help: str) -> None:
    """``--nproc N``: the command re-runs itself in N processes (see ``_wants_launch``)."""
    p.add_argument("--nproc", type=_count(1), help=help)


def _add_job_flags(
    p: argparse.ArgumentParser, *, overrides: str, run_dir: str, resume: str | None = None, nproc: str | None = None
) -> None:
    """The flags of a command that starts training runs, in this order: --set, --run-dir, [--resume],
    [--nproc], --no-memory-check; each argument is that flag's help text."""
    _add_overrides(p, overrides)
    p.add_argument("--run-dir", help=run_dir)
    if resume is not None:
        p.add_argument("--resume", metavar="auto|PATH", help=resume)
    if nproc is not None:
        _add_nproc(p, nproc)
    _add_memory_check_flag(p)


def _add_split(p: argparse.ArgumentParser, help: str = "val (default), train, or test") -> None:
    p.add_argument("--split", default="val", help=help)


def _add_max_batches(p: argparse.ArgumentParser, help: str = "per process; 0 = the whole split") -> None:
    p.add_argument("--max-batches", type=_count(0), default=0, help=help)


def _add_run(p: argparse.ArgumentParser, help: str = "a finished run directory") -> None:
    p.add_argument("run", help=help)


def _add_runs(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help=help)


_TRAIN_EPILOG = """\
examples:
  ember train recipes/cnn-digits.yaml --run-dir runs/cnn --set train.max_steps=200
  ember train --run-dir runs/cnn --resume auto     # continue after a crash or Ctrl-C

recipe keys (for --set section.key=value): ember recipe explain KEY, e.g.
  ember recipe explain schedule.warmup_fraction; all keys: README.md, "Recipe reference"
"""


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML recipe",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "recipe",
        nargs="?",
        help="path to a YAML recipe, e.g. recipes/gpt-tiny.yaml (omit with --resume: RUN/recipe.yaml)",
    )
    _add_job_flags(
        p,
        overrides="override a recipe key (repeatable)",
        run_dir="where the run is written (default runs/RECIPE-TIMESTAMP)",
        resume="continue from the newest valid checkpoint in --run-dir, or from PATH",
        nproc="train in N processes on this machine (torch.distributed.run; parallel.strategy auto picks the layout)",
    )
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy, precision, recall, F1, confusion matrix (classifiers) or loss, "
        "perplexity, bits per byte (language models) of a finished run",
    )
    _add_run(p, "run directory holding model.safetensors")
    _add_split(p)
    p.add_argument("--batch-size", type=_count(0), default=0, help="0 = the recipe's eval batch size")
    _add_max_batches(p)
    p.add_argument(
        "--beam", type=_count(1), default=1, help="seq2seq: decode by beam search over N hypotheses; 1 = greedy"
    )
    p.add_argument(
        "--decode-samples",
        type=_count(0),
        default=1000,
        help="seq2seq: decode this many samples of the split for BLEU and decoded exact match (0 = all)",
    )
    _add_nproc(p, "evaluate in N processes (each sample once across them)")
    p.set_defaults(func=cmd_eval)


def _add_cv_parser(sub) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation: train K fold runs, mean ± std of every metric")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    p.add_argument("--stratified", action="store_true", help="keep each class's share in every fold (classifiers)")
    _add_job_flags(
        p,
        overrides="override a recipe key (repeatable)",
        run_dir="where the folds are written (default runs/cv-RECIPE-TIMESTAMP); run again with the same one to resume",
        nproc="train each fold in N processes",
    )
    p.set_defaults(func=cmd_cv)


def _add_ensemble_parser(sub) -> None:
    p = sub.add_parser(
        "ensemble",
        help="score an ensemble of runs and each run alone: mean probabilities, "
        "majority vote, or a weight soup (a new run directory)",
    )
    _add_runs(p, "run directories of one data set (e.g. CV/fold_*)")
    p.add_argument(
        "--method",
        choices=("mean", "vote", "soup"),
        default="mean",
        help="mean: average probabilities (default); vote: majority of predicted classes (classifiers); "
        "soup: average the weights of runs sharing model section and train.seed",
    )
    _add_split(p, "val (default), train, or test (fold runs: test)")
    p.add_argument("--batch-size", type=_count(0), default=0, help="0 = the first run's eval batch size")
    _add_max_batches(p)
    p.add_argument(
        "--out",
        help="report path (default ensemble-METHOD.json in the runs' common parent; "
        "soup: the soup run directory beside it, without .json)",
    )
    _add_nproc(p, "evaluate in N processes (each sample once across them)")
    p.set_defaults(func=cmd_ensemble)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="hyper-parameter search (Optuna): grid, random or TPE, with pruning; resumable")
    p.add_argument("recipe", help="path to a YAML recipe: the starting point of every trial")
    p.add_argument(
        "--space",
        required=True,
        help="YAML file: recipe keys → {type: float|int, low, high[, log][, step]} "
        "or {type: categorical, choices: [...]}",
    )
    p.add_argument("--sampler", default="tpe", choices=["grid", "random", "tpe"])
    p.add_argument(
        "--trials", type=_count(1), default=20, help="finished (complete or pruned) trials the study should hold"
    )
    p.add_argument(
        "--pruner",
        default="median",
        choices=["median", "hyperband", "none"],
        help="stop bad trials early at their validations (train.eval_every)",
    )
    p.add_argument(
        "--startup-trials", type=_count(0), default=5, help="trials before the median pruner and TPE start to act"
    )
    p.add_argument(
        "--storage", help="Optuna storage URL (default sqlite:///RUN_DIR/study.db); share one across machines"
    )
    p.add_argument("--study", default="ember", help="study name inside the storage")
    p.add_argument("--seed", type=_SEED, default=0, help="sampler seed")
    _add_job_flags(
        p,
        overrides="override a recipe key (repeatable)",
        run_dir="where trials, study.db, tune.json and best.yaml go (default runs/tune-RECIPE-TIMESTAMP); "
        "run again with the same one to resume",
        nproc="train each trial in N processes",
    )
    p.set_defaults(func=cmd_tune)


def _add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a student recipe taught by a finished teacher run (soft targets)")
    p.add_argument("--teacher", required=True, help="finished run directory of the teacher")
    p.add_argument("--student", required=True, help="the student's YAML recipe (same data as the teacher)")
    p.add_argument("--temperature", type=float, default=2.0, help="softens both distributions (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft targets; 1 - alpha on the labels")
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=0.0,
        metavar="BETA",
        help="also match the last hidden states' within-sample cosine similarities, weighted BETA (0: off)",
    )
    _add_job_flags(
        p,
        overrides="override a student recipe key",
        run_dir="where the student run goes (default runs/distill-RECIPE-TIMESTAMP)",
        resume="continue the student run in --run-dir",
        nproc="train the student in N processes",
    )
    p.set_defaults(func=cmd_distill)


def _add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a language-model run (or answer with a seq2seq run, or name the classes of a text with a labelled-text run)",
    )
    _add_run(p, "run directory holding model.safetensors")
    p.add_argument(
        "--prompt", default="", help="text to continue (seq2seq runs: the source; addition runs: a sum like 123+456)"
    )
    p.add_argument("--max-new-tokens", type=_count(1), default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_count(0), default=50, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--beam", type=_count(1), default=1, help="seq2seq runs: beam search over N hypotheses; 1 = greedy")
    p.set_defaults(func=cmd_generate)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a finished run's model as a Hugging Face checkpoint (--format hf) or an ONNX graph (--format onnx), "
        "checked against ember's outputs",
    )
    _add_run(p)
    p.add_argument(
        "--format", default="hf", choices=("hf", "onnx"), help="hf: transformers directory; onnx: classifiers"
    )
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--merge", action="store_true", help="fold LoRA adapters into the weights first")
    p.set_defaults(func=cmd_export)


def _add_quantize_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="int8 post-training quantisation (torchao) into a new run directory, "
        "with the size, latency and quality table",
    )
    _add_run(p)
    p.add_argument(
        "--method",
        default="int8-dynamic",
        metavar="int8-dynamic|int8-weight-only",
        help="int8-dynamic (default: int8 weights and per-batch int8 activations) or int8-weight-only",
    )
    p.add_argument("--out", help="the new run directory (default RUN-METHOD beside RUN)")
    p.add_argument(
        "--calibration-batches",
        type=_count(0),
        default=0,
        help="for static quantisation only; both methods here need no calibration (0)",
    )
    _add_max_batches(p, "quality over this many val batches; 0 = the whole split")
    p.set_defaults(func=cmd_quantize)


def _add_prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="magnitude pruning (masks or whole channels), optionally iterative with "
        "fine-tuning, into a new run directory, with the trade-off table",
    )
    _add_run(p)
    p.add_argument(
        "--amount",
        type=float,
        required=True,
        help="share removed: of the conv/linear weights (l1-unstructured, global) or of all parameters (structured)",
    )
    p.add_argument(
        "--method",
        default="l1-unstructured",
        metavar="l1-unstructured|global|structured",
        help="l1-unstructured (default: each layer alike), global (smallest weights anywhere), "
        "structured (whole channels, neurons and heads: a smaller, faster model)",
    )
    p.add_argument(
        "--iterative", type=_count(1), default=1, metavar="K", help="reach --amount in K prune (+ fine-tune) rounds"
    )
    p.add_argument(
        "--finetune-steps", type=_count(0), default=0, metavar="S", help="training steps after pruning, over all rounds"
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        help="peak fine-tuning learning rate, decayed on a cosine each round (default: the recipe's optim.lr)",
    )
    _add_overrides(p, "override a fine-tuning recipe key")
    p.add_argument("--out", help="the new run directory (default RUN-METHOD-PERCENT beside RUN); again to resume")
    _add_max_batches(p, "quality over this many val batches; 0 = the whole split")
    p.set_defaults(func=cmd_prune)


def _add_continue_parser(sub) -> None:
    p = sub.add_parser(
        "continue", help="train a finished run further on new data (replay, EWC); report gain and forgetting"
    )
    _add_run(p)
    p.add_argument(
        "--data", required=True, help="YAML with the new data section (or a recipe whose data section is used)"
    )
    p.add_argument(
        "--replay",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of the training set drawn from the old data (0 = none)",
    )
    p.add_argument(
        "--ewc", type=float, default=0.0, metavar="LAMBDA", help="elastic weight consolidation strength (0 = off)"
    )
    _add_job_flags(
        p,
        overrides="override a key of the continued recipe",
        run_dir="the continued run (default RUN-continued beside RUN)",
        resume="continue an interrupted continued run in --run-dir",
    )
    p.set_defaults(func=cmd_continue)


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="size, CPU latency and quality of several runs side by side")
    _add_runs(p, "run directories; ratios are relative to the first")
    _add_split(p)
    _add_max_batches(p, "quality over this many batches; 0 = the whole split")
    p.set_defaults(func=cmd_compare)


def _add_probe_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="linear probe: a logistic regression on a finished image run's frozen features "
        "(SimCLR, CLIP, any cnn/vit), against the same on a randomly initialised copy",
    )
    _add_run(p)
    _add_split(p, "scored on val (default) or test; fitted on train")
    p.add_argument("--no-baseline", action="store_true", help="skip the randomly initialised copy")
    p.set_defaults(func=cmd_probe)


def _add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run: curves, validation metrics, confusion "
        "matrix, search, cross-validation, compression; several runs compared",
    )
    _add_runs(
        p,
        "run directories (a tune or cv directory too); several: one page, curves overlaid, final metrics side by side",
    )
    p.add_argument(
        "--out",
        help="the HTML file (default RUN/report.html for one run, ./report.html for several; "
        "a directory gets report.html inside)",
    )
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="do not evaluate a classifier lacking eval.json for its confusion matrix (the page says it is left out)",
    )
    p.set_defaults(func=cmd_report)


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict parameters, FLOPs and memory per device for each parallel layout")
    p.add_argument("recipe")
    _add_overrides(p, help=None)
    p.add_argument("--gpus", type=_count(1), default=1)
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 24GiB")
    p.add_argument("--gpu", default="h100", help="GPU kind for the throughput estimate")
    p.set_defaults(func=cmd_plan)


def cmd_recipe_show(args: argparse.Namespace) -> int:
    from ember.recipe_tools import show_recipe

    print(show_recipe(args.recipe, args.set), end="")
    return 0


def cmd_recipe_explain(args: argparse.Namespace) -> int:
    from ember.recipe_tools import explain_key

    print(explain_key(args.key, args.model))
    return 0


def cmd_recipe_schema(args: argparse.Namespace) -> int:
    import json

    from ember.atomic import write_text_atomic
    from ember.recipe_tools import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    if args.out is None:
        print(text, end="")
        return 0
    try:
        write_text_atomic(Path(args.out), text)
    except OSError as err:
        raise EmberError(f"Cannot write the schema to {args.out} ({err.strerror}); choose another --out.") from None
    print(f"recipe schema written to {args.out}")
    return 0


def _add_recipe_parser(sub) -> None:
    recipe = sub.add_parser("recipe", help="show a resolved recipe, explain a key, write the JSON schema for editors")
    rsub = recipe.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    p = rsub.add_parser("show", help="the recipe as it runs: base: merged, --set applied, every default filled in")
    p.add_argument("recipe", help="path to a YAML recipe")
    _add_overrides(p)
    p.set_defaults(func=cmd_recipe_show)
    p = rsub.add_parser("explain", help="a key's type, range, default and description; a section's keys")
    p.add_argument(
        "key", nargs="?", default="", help="e.g. optim.lr, train, model.n_layer, plugins.ema (none: sections)"
    )
    p.add_argument("--model", metavar="NAME", help="explain model.* keys for this model.name (e.g. gpt)")
    p.set_defaults(func=cmd_recipe_explain)
    p = rsub.add_parser("schema", help="the recipe JSON schema, for an editor to check and complete recipe files")
    p.add_argument("--out", metavar="FILE", help="write it here (default: print it)")
    p.set_defaults(func=cmd_recipe_schema)


def cmd_completion(args: argparse.Namespace) -> int:
    from ember.completion import completion_script

    print(completion_script(build_parser(), args.shell), end="")
    return 0


def _add_completion_parser(sub) -> None:
    p = sub.add_parser("completion", help="print the bash or zsh completion script (commands, flags, --set keys)")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=cmd_completion)


def _add_not_yet_parsers(sub) -> None:
    for name, (what, issue) in NOT_YET.items():
        p = sub.add_parser(name, help=f"{what} (not yet: issue #{issue})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, name=name, issue=issue: _not_yet(name, issue))


# The subcommands in the order `ember --help` lists them.
_COMMAND_PARSERS = (
    _add_train_parser,
    _add_eval_parser,
    _add_cv_parser,
    _add_ensemble_parser,
    _add_tune_parser,
    _add_distill_parser,
    _add_generate_parser,
    _add_export_parser,
    _add_quantize_parser,
    _add_prune_parser,
    _add_continue_parser,
    _add_compare_parser,
    _add_probe_parser,
    _add_report_parser,
    _add_data_commands,
    _add_plan_parser,
    _add_recipe_parser,
    _add_completion_parser,
    _add_not_yet_parsers,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ember", description="Train neural models end to end from one recipe.")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    _add_verbosity(parser, default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMAND_PARSERS:
        add(sub)
    _add_verbosity_to_commands(sub)
    return parser


def _add_verbosity(p: argparse.ArgumentParser, default: object) -> None:
    """-q/--quiet and -v/--verbose, read by ``main`` (``ember.log.configure_logging``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=default,
        help="warnings and errors only, no progress bars",
    )  # fmt: skip
    group.add_argument(
        "-v", "--verbose", action="store_const", const=1, dest="verbosity", default=default,
        help="also debugging messages (and a line per logged step beside the progress bar)",
    )  # fmt: skip


def _add_verbosity_to_commands(sub: argparse._SubParsersAction) -> None:
    """The flags after a command too (``ember train -q ...``); not given there, the one before it stands."""
    for command in set(sub.choices.values()):
        _add_verbosity(command, default=argparse.SUPPRESS)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbosity_to_commands(action)


def _not_yet(name: str, issue: int) -> int:
    raise EmberError(
        f"`ember {name}` is not available yet: it arrives with issue #{issue}. See README.md for the commands that work today."
    )


_REFUSED_BY_DISK = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _disk_refusal(err: OSError) -> str:
    """One paragraph for a path the system refused (permissions, a read-only or full disk) that no
    inner block explained: the file the user named (or its temporary twin) and the fix."""
    return (
        f"Cannot use {err.filename or 'a file'}: {err.strerror}. Point the command at a path you may read and "
        f"write (a directory of yours, on a disk with free space), or fix its permissions, and run again."
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or an argument mistake (one paragraph, already printed)
        return done.code if isinstance(done.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    from ember.log import configure_logging
    from ember.training.launcher import record_failure

    configure_logging(args.verbosity)

    if getattr(args, "no_memory_check", False):
        os.environ["EMBER_SKIP_MEMORY_CHECK"] = "1"  # read where the run starts; inherited by --nproc ranks
    try:
        return args.func(args)
    except EmberError as err:
        if not record_failure(err):  # one rank of --nproc: the launcher prints the first failure
            print(f"ember: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _REFUSED_BY_DISK:
            if record_failure(err):
                return 1
            raise
        refusal = EmberError(_disk_refusal(err))
        if not record_failure(refusal):
            print(f"ember: error: {refusal}", file=sys.stderr)
        return 2
    except Exception as err:
        if record_failure(err):
            return 1
        raise
    except KeyboardInterrupt as err:
        if _is_main_rank():  # every rank stops alike: one says so
            print(f"ember: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
