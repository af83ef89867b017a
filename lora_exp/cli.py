"""`lora-exp` entry point: subcommands -> plain functions. Hydra overrides pass straight through.

    lora-exp train [overrides...]              train one adapter, tracked in MLflow
    lora-exp sweep [options] [overrides...]    Optuna search
                                               options: sweep= n_trials= workers= storage= study= timeout= pack=
    lora-exp best [study=NAME] [storage=URL] [--promote RUN_ID]
                                               best trial (or Pareto front): run ids, objectives, the command
    lora-exp rerun RUN_ID [overrides...]       retrain from the config recorded with a run
    lora-exp export RUN_ID --out DIR [--merge] the adapter (or a merged model) + tokenizer, ready for peft
    lora-exp generate RUN_ID "prompt"          try an adapter from the terminal
    lora-exp prepare [overrides...]            convert the offline default model once (make setup)

RUN_ID: a trial's or a training run's id, a sweep's parent run id (= its best trial), or models:/NAME@ALIAS.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from lora_exp.errors import LoraExpError

log = logging.getLogger("lora_exp")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="lora-exp", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train one adapter from the composed config")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. lora.r=16 trainer.lr=3e-4 model=tiny_llama")
    p = sub.add_parser("prepare", help="prepare the model once (convert the offline GGUF default into the cache)")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("sweep", help="Optuna search over LoRA configs; trials nested in MLflow")
    p.add_argument("overrides", nargs="*",
                   help="sweep options (sweep=NAME n_trials=N workers=N storage=URL study=NAME timeout=S "
                        "pack=K) and config overrides")
    p = sub.add_parser("best", help="best trial of a study (its Pareto front if it has several objectives)")
    p.add_argument("options", nargs="*", help="study=NAME storage=URL")
    p.add_argument("--promote", metavar="RUN_ID", help="point models:/<study>@best at this trial's run")
    p = sub.add_parser("rerun", help="retrain from the config recorded with a run")
    p.add_argument("run_id")
    p.add_argument("overrides", nargs="*", help="overrides applied to the recorded config")
    p = sub.add_parser("export", help="export a run's adapter (or a merged model) with its tokenizer")
    p.add_argument("run_id")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base (standalone model)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("overrides", nargs="*", help="tracking.uri=... to read from another store")
    p = sub.add_parser("generate", help="generate with a run's adapter")
    p.add_argument("run_id")
    p.add_argument("prompts", nargs="+", help='prompts; "\\n" is a newline')
    p.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import warnings

    # Deprecation chatter from transformers/peft internals, not actionable by a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return dispatch(args)
    except LoraExpError as exc:
        print(f"lora-exp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lora-exp: interrupted", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    """The subcommand's plain function, imported only when it runs (a bad argument fails fast)."""
    if args.command == "train":
        from lora_exp.runs.train import cmd_train

        return cmd_train(args.overrides)
    if args.command == "prepare":
        from lora_exp.runs.train import cmd_prepare

        return cmd_prepare(args.overrides)
    if args.command == "sweep":
        from lora_exp.pack.worker import run_packed_worker
        from lora_exp.sweep.command import cmd_sweep

        return cmd_sweep(args.overrides, packed=run_packed_worker)
    if args.command == "best":
        from lora_exp.runs.best import cmd_best

        return cmd_best(args.options, promote=args.promote)
    if args.command == "rerun":
        from lora_exp.runs.rerun import cmd_rerun

        return cmd_rerun(args.run_id, args.overrides)
    if args.command == "export":
        from lora_exp.runs.export import cmd_export

        return cmd_export(args.run_id, args.out, args.merge, args.force, args.overrides)
    from lora_exp.runs.generate import cmd_generate

    store = [p for p in args.prompts if p.startswith("tracking.")]  # tracking.uri=... picks the store
    return cmd_generate(args.run_id, [p for p in args.prompts if p not in store], args.max_new_tokens, store)


if __name__ == "__main__":
    sys.exit(main())
