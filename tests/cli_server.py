"""A process that has imported the heavy third-party libraries once and forks a child for each
`lora-exp` call a test makes (`helpers.run_cli`): the child runs the real entry point in its own
process, cwd, environment, stdout and stderr, with real exit codes and signals, but starts in
~0.1 s instead of the 5-10 s that importing torch and transformers costs on 2 cores. The e2e
tests start ~150 CLI processes, so this is most of `make test`'s time.

Not preloaded, so each child imports them as a fresh process would: lora_exp itself (it reads its
settings at import) and MLflow (it sets its loggers' level from the environment the CLI sets up
when imported). Calls whose behaviour depends on what happens at import time go to a real process
instead (`helpers.run_cli` decides): a verbose run (`-v`: MLflow's log level), and an
environment that differs from this server's in a variable the preloaded libraries read when
imported (HF_*, TORCH*, OMP_* ...). Tests that watch start-up itself (what loads before a bad
config is refused, `make` targets) start their own processes.

Protocol (JSON lines on stdin/stdout): a request {"argv", "cwd", "env", "stdout", "stderr"}
(the last two: files the child writes) is answered {"pid"} at once and {"exit"} when the child
has ended (its exit code, or -N for a signal, as subprocess reports it).
"""
from __future__ import annotations

import json
import os
import sys
import threading


def preload() -> None:
    import numpy  # noqa: F401
    import optuna  # noqa: F401
    import optuna.storages._rdb.storage  # noqa: F401
    import peft  # noqa: F401
    import sqlalchemy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import transformers  # noqa: F401
    import yaml  # noqa: F401
    from hydra import compose  # noqa: F401
    from omegaconf import OmegaConf  # noqa: F401
    from safetensors.torch import save_file  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedModel  # noqa: F401
    from transformers.models.gpt2 import modeling_gpt2  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401


def child(request: dict) -> None:
    """Become the CLI process of `request` (never returns)."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
        # as the console script runs it: its path is __main__ (what multiprocessing's spawned
        # children import as their main module), argv[0] the script
        import types

        main_module = types.ModuleType("__main__")
        main_module.__file__ = request["argv"][0]
        sys.modules["__main__"] = main_module
        sys.argv = list(request["argv"])
        from lora_exp.cli import main

        try:
            code = main()
        except SystemExit as exc:
            code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught error ends the process as Python would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # what the interpreter does at exit: join non-daemon threads, run atexit, flush
        try:
            threading._shutdown()  # type: ignore[attr-defined]
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if isinstance(code, int) else 1)


def main() -> None:
    preload()
    ready = {"ready": threading.active_count() == 1}  # forking is safe only with no other thread
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
