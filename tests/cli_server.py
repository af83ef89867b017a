"""The tests' `lora-exp` calls (`helpers.run_cli`): a process that has imported the heavy
third-party libraries once forks a child for each call (`CliServer` is the tests' side): the child
runs the real entry point in its own
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

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


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


class CliServer:
    """The test session's side: the one server process (`get`: None where it cannot fork safely,
    or LORA_EXP_TEST_PRELOAD=0), and a call run through it (`run`)."""

    #: environment variables the preloaded libraries read when imported: a call that sets them
    #: otherwise than the server's environment runs in a fresh process
    IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "CUDA", "TOKENIZERS",
                   "PYTHON", "SQLALCHEMY", "NUMPY", "OPENBLAS")
    _instance: "CliServer | None" = None
    _started = False

    @classmethod
    def get(cls) -> "CliServer | None":
        if not cls._started:
            cls._started = True
            if os.environ.get("LORA_EXP_TEST_PRELOAD", "1") != "0" and hasattr(os, "fork"):
                server = cls()
                cls._instance = server if server.ready else None
        return cls._instance

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, __file__],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        atexit.register(self.close)
        line = self.proc.stdout.readline()
        self.ready = bool(line) and json.loads(line).get("ready", False)

    def serves(self, args: tuple[str, ...], env: dict[str, str]) -> bool:
        if "-v" in args or "--verbose" in args:  # MLflow's loggers: their level is set when it is imported
            return False
        keys = {k for k in {*env, *self.env} if k.upper().startswith(self.IMPORT_TIME)}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float):

        with tempfile.TemporaryDirectory(prefix="lora-exp-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            answer: list[str] = []
            reader = threading.Thread(target=lambda: answer.append(self.proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            timed_out = reader.is_alive()
            if timed_out:  # as subprocess.run: kill the process, then raise
                os.kill(pid, signal.SIGKILL)
                reader.join()
            code = json.loads(answer[0])["exit"]
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, code, stdout, stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    main()
