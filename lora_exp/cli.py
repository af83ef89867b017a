"""`lora-exp`: LoRA fine-tuning sweeps, tracked in MLflow. Each subcommand is a plain function;
Hydra overrides (`key=value`, `group=option`) pass straight through."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

from lora_exp import __version__
from lora_exp.core import logs
from lora_exp.errors import LoraExpError

log = logging.getLogger("lora_exp")

EXIT_CODES = """exit codes:
  0    done
  1    a run or sweep failed (a trial's error, max_failures reached, a store that went away)
  2    bad input: a wrong override or value, a bad sweep file, data, run id, path or URL
       (one line naming it, before anything is written)
  130  interrupted (Ctrl-C)"""

RUN_ID_HELP = ("RUN_ID: a trial's or a training run's id, a sweep's parent run id (= its best trial), "
               "or models:/NAME@ALIAS")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`export RUN --out DIR tracking.uri=...`) are overrides
        strays = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
        if strays:
            parser.error(f"unrecognized arguments: {' '.join(strays)}")
        args.overrides = [*args.overrides, *extra]
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if verbose:
        os.environ["LORA_EXP_VERBOSE"] = "1"  # worker and helper processes inherit it
    else:  # MLflow sets its loggers' level when imported (later): it reads this
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logs.configure(quiet=quiet)
    import warnings

    # Deprecation chatter from transformers/peft internals, not actionable by a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    from lora_exp.core import interrupts

    try:
        with interrupts.answering():
            return dispatch(args)
    except LoraExpError as exc:
        print(f"lora-exp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lora-exp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lora-exp config | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and results")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also the engine's internals (packed sweeps) and the libraries' logs")
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="lora-exp", description=__doc__, formatter_class=raw, parents=[common],
                                     epilog=f"`lora-exp COMMAND --help` for each command.\n\n{EXIT_CODES}")
    parser.add_argument("--version", action="version", version=f"lora-exp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, parents=[common], formatter_class=raw,
                              epilog=epilog)

    p = command("train", "train one adapter from the composed config, tracked in MLflow",
                f"examples:\n  lora-exp train lora.r=16 trainer.lr=3e-4\n  lora-exp train model=tiny_llama data=seed"
                f"\n\n{groups_help()}\n\nAll keys and their defaults: lora-exp config")
    p.add_argument("overrides", nargs="*", default=[], help="Hydra overrides: key=value, group=option")
    p = command("sweep", "an Optuna search over LoRA configs: one nested MLflow run per trial, resumable",
                f"sweep options (the rest are config overrides):\n"
                f"  sweep=NAME|PATH.yaml   the search space and study settings ({sweeps_help()})\n"
                f"  n_trials=N             trials in the study in all (running again resumes up to N)\n"
                f"  workers=N              worker processes on one study\n"
                f"  storage=URL            Optuna storage ($OPTUNA_STORAGE, else sqlite:///mlruns/optuna.db)\n"
                f"  study=NAME             the study (= parent run, registered model) name\n"
                f"  timeout=SECONDS        no trial starts after it\n"
                f"  pack=K                 on a GPU: K trials at once on one base model (pack.slots)\n"
                f"  warm_start=STUDY[:K]   run the K best trials of another study first (K=5)\n"
                f"  enqueue=FILE.yaml      run the listed override sets first\n\n"
                f"examples:\n  lora-exp sweep\n  lora-exp sweep sweep=tiny n_trials=20 workers=2\n"
                f"  lora-exp sweep --dry-run        the first trials' overrides, nothing trained\n\n{groups_help()}")
    p.add_argument("overrides", nargs="*", default=[], help="sweep options and config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the first trials' overrides; train nothing")
    p = command("config", "print the composed config (YAML) the overrides give, validated",
                f"example:\n  lora-exp config model=tiny_llama lora.r=4\n\n{groups_help()}")
    p.add_argument("overrides", nargs="*", default=[], help="Hydra overrides")
    p = command("ui", "the MLflow UI over the tracking store, with the link to the latest sweep",
                "example:\n  lora-exp ui                      (sqlite:///mlruns/mlflow.db, or $MLFLOW_TRACKING_URI)\n"
                "  lora-exp ui tracking.uri=sqlite:///elsewhere/mlflow.db --port 5001")
    p.add_argument("overrides", nargs="*", default=[], help="tracking.uri=...")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p = command("best", "the best trial of a study (its Pareto front with several objectives), and the command "
                        "that reproduces it")
    p.add_argument("options", nargs="*", default=[], help="study=NAME storage=URL tracking.uri=URL")
    p.add_argument("--promote", metavar="RUN_ID", help="point models:/<study>@best at this trial's run")
    p = command("rerun", "retrain from the config recorded with a run", RUN_ID_HELP)
    p.add_argument("run_id")
    p.add_argument("overrides", nargs="*", default=[], help="overrides applied to the recorded config")
    p = command("export", "export a run's adapter (or the model merged with it) and its tokenizer", RUN_ID_HELP)
    p.add_argument("run_id")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base (a standalone model)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("overrides", nargs="*", default=[], help="tracking.uri=... to read from another store")
    p = command("generate", "generate with a run's adapter", RUN_ID_HELP)
    p.add_argument("run_id")
    p.add_argument("prompts", nargs="+", help='prompts ("\\n" is a newline); tracking.uri=... picks the store')
    p.add_argument("--max-new-tokens", type=int, default=None)
    p = command("compare", "runs' answers to the eval prompts side by side with the base model's, with scores "
                           "(printed, and logged as answers.json in a run of its own)",
                "example:\n  lora-exp compare RUN_A RUN_B RUN_C\n" + RUN_ID_HELP)
    p.add_argument("run_ids", nargs="+", help="runs to compare (and tracking.uri=... to pick the store)")
    p.add_argument("--no-log", action="store_true", help="print only; log nothing")
    p = command("prepare", "prepare the model once (convert the offline GGUF default into the cache; make setup)")
    p.add_argument("overrides", nargs="*", default=[])
    return parser


def groups_help() -> str:
    """The config groups and their options (what `group=option` can name)."""
    try:
        from lora_exp.compose import config_options

        groups = config_options()
    except OSError:
        return ""
    width = max(map(len, groups), default=0)
    return "config groups (group=option):\n" + "\n".join(
        f"  {group:<{width}}  {', '.join(options)}" for group, options in groups.items())


def sweeps_help() -> str:
    try:
        from lora_exp.sweep.spec import sweep_names

        return "shipped: " + ", ".join(sweep_names())
    except OSError:
        return ""


def packed_worker(*args: Any) -> bool:
    """`pack.worker.run_packed_worker`, imported when a pack runs: a sweep checks its input
    (and refuses bad input) before torch, transformers or MLflow load."""
    from lora_exp.pack.worker import run_packed_worker

    return run_packed_worker(*args)


def dispatch(args: argparse.Namespace) -> int:
    """The subcommand's plain function, imported only when it runs (a bad argument fails fast)."""
    if args.command == "train":
        from lora_exp.runs.train import cmd_train

        return cmd_train(args.overrides)
    if args.command == "sweep":
        from lora_exp.sweep.command import cmd_sweep, dry_run

        if args.dry_run:
            return dry_run(args.overrides)
        return cmd_sweep(args.overrides, packed=packed_worker)
    if args.command == "config":
        from lora_exp.runs.train import cmd_config

        return cmd_config(args.overrides)
    if args.command == "ui":
        from lora_exp.runs.ui import cmd_ui

        return cmd_ui(args.overrides, args.host, args.port)
    if args.command == "best":
        from lora_exp.runs.best import cmd_best

        return cmd_best(args.options, promote=args.promote)
    if args.command == "rerun":
        from lora_exp.runs.rerun import cmd_rerun

        return cmd_rerun(args.run_id, args.overrides)
    if args.command == "export":
        from lora_exp.runs.export import cmd_export

        return cmd_export(args.run_id, args.out, args.merge, args.force, args.overrides)
    if args.command == "compare":
        from lora_exp.runs.compare import cmd_compare

        refs = [r for r in args.run_ids if not r.startswith("tracking.")]
        store = [r for r in args.run_ids if r.startswith("tracking.")] + list(getattr(args, "overrides", []))
        return cmd_compare(refs, store, log=not args.no_log)
    if args.command == "prepare":
        from lora_exp.runs.train import cmd_prepare

        return cmd_prepare(args.overrides)
    from lora_exp.runs.generate import cmd_generate

    store = [p for p in args.prompts if p.startswith("tracking.")]  # tracking.uri=... picks the store
    return cmd_generate(args.run_id, [p for p in args.prompts if p not in store], args.max_new_tokens, store)


def exit_status(code: object) -> int:
    """A SystemExit's code as the process's exit status, as Python makes it (None: 0; a message:
    printed, 1)."""
    if code is None:
        return 0
    if not isinstance(code, int):
        print(code, file=sys.stderr)
        return 1
    return code & 0xFF


def end_process(status: int) -> NoReturn:
    """End the process as the interpreter would at exit, less its teardown: non-daemon threads
    joined (executors' too), the exit handlers run (MLflow's, logging's), the output flushed."""
    try:
        import atexit
        import threading

        getattr(threading, "_shutdown", lambda: None)()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def entry() -> None:
    """The `lora-exp` console script: `main`, then `end_process`. Once a command is done, the
    interpreter would free the modules of torch, transformers and MLflow one object at a time
    (2-3 s after a training run) for nothing anyone reads. An uncaught error ends the process as
    Python does."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    end_process(exit_status(code))


if __name__ == "__main__":
    entry()
