"""The tests' `lora-exp` calls (`helpers.run_cli`): a process that has imported the heavy
third-party libraries once forks a child for each call (`CliServer` is the tests' side): the child
runs the real entry point in its own
process, cwd, environment, stdout and stderr, with real exit codes and signals, but starts in
~0.1 s instead of the 5-10 s that importing torch and transformers costs on 2 cores. The e2e
tests start ~150 CLI processes, so this is most of `make test`'s time.

MLflow is preloaded as the CLI imports it: it sets its loggers' level when imported, from
MLFLOW_LOGGING_LEVEL, which the CLI sets to WARNING unless verbose. Not preloaded, so each child
imports it as a fresh process would: lora_exp itself (it reads its settings at import). Calls
whose behaviour depends on what happens at import time go to a real process instead
(`helpers.run_cli` decides): a verbose run (`-v`: MLflow's log level), and an environment that
differs from this server's in a variable the preloaded libraries read when imported (HF_*,
TORCH*, OMP_*, MLFLOW_LOGGING_LEVEL, MPL* ...). Tests that watch start-up itself (what loads
before a bad config is refused, `make` targets) start their own processes.

Protocol (JSON lines on stdin/stdout): a request {"argv", "cwd", "env", "stdout", "stderr"}
(the last two: files the child writes; the same file for both merges them, as stderr=STDOUT) is
answered {"pid"} at once, and {"exit", "pid"} when that child has ended (its exit code, or -N for
a signal, as subprocess reports it). Children run side by side: a test may start several and
signal, read or wait for each (`ServedProcess`, subprocess.Popen's interface).
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
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

    # MLflow's loggers as a CLI that is not verbose has them (cli.main sets this before it imports
    # MLflow); the stores' modules too (~2.5 s a child on 2 cores). Nothing is opened: no thread
    # or connection crosses a fork.
    unset = "MLFLOW_LOGGING_LEVEL" not in os.environ
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401
    if unset:
        del os.environ["MLFLOW_LOGGING_LEVEL"]
    # what a sweep imports after its first trial (~1.5 s): the parent's plots (on Agg, as
    # tracking.sweep_plots picks it), trial notes, ROUGE
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import optuna.importance  # noqa: F401
    from optuna.visualization import matplotlib as _ov  # noqa: F401
    from optuna_dashboard import save_note  # noqa: F401
    from rouge_score import rouge_scorer  # noqa: F401


def child(request: dict) -> None:
    """Become the CLI process of `request` (never returns)."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_TRUNC)
        err = out if request["stderr"] == request["stdout"] else os.open(request["stderr"], os.O_WRONLY | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        # as the console script runs it: its path is __main__ (what multiprocessing's spawned
        # children import as their main module), argv[0] the script
        import types

        main_module = types.ModuleType("__main__")
        main_module.__file__ = request["argv"][0]
        sys.modules["__main__"] = main_module
        sys.argv = list(request["argv"])
        from lora_exp.cli import exit_status, main

        try:
            code = main()
        except SystemExit as exc:
            code = exc.code
        code = exit_status(code)
    except BaseException:  # noqa: BLE001 - an uncaught error ends the process as Python would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:  # as the console script ends (`lora_exp.cli.entry`)
            from lora_exp.cli import end_process

            end_process(code if isinstance(code, int) else 1)
        finally:
            os._exit(1)  # a forked child never returns to the server's loop


def main() -> None:
    import selectors

    preload()
    import gc

    # the preloaded heap moves to a generation the collector never visits: a child's collections
    # would otherwise touch every inherited object, copying its pages (copy-on-write)
    gc.collect()
    gc.freeze()
    ready = {"ready": threading.active_count() == 1}  # forking is safe only with no other thread
    print(json.dumps(ready), flush=True)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    pending, running, open_ = b"", 0, True
    while open_ or running:
        if open_ and selector.select(timeout=0.02):
            data = os.read(0, 1 << 16)
            open_ = bool(data)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    child(json.loads(line))
                running += 1
                print(json.dumps({"pid": pid}), flush=True)
        elif not open_:
            time.sleep(0.02)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running -= 1
            print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "pid": pid}), flush=True)


class ServedProcess:
    """A CLI call the server forked, as subprocess.Popen(..., stdout=PIPE, stderr=STDOUT, text=True)
    offers it: `stdout` yields its output lines as they are written (until it has ended and all
    is read), and pid, poll, wait, communicate, send_signal, terminate, kill, returncode."""

    def __init__(self, server: "CliServer", argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.args = argv
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-exp-cli-")
        path = Path(self._tmp.name, "output")
        path.touch()
        self._ended = threading.Event()
        self.returncode: int | None = None
        self.pid = server.start({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(path), "stderr": str(path)},
                                self._exited)
        self._file = open(path, errors="replace")  # noqa: SIM115 - read as the process writes, closed at its end
        self.stdout = self
        self.stderr = None

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    # -- the output, as a pipe reads

    def readline(self) -> str:
        line = ""
        while True:
            ended = self._ended.is_set()  # before reading: what it wrote before it ended is in the file
            line += self._file.readline()
            if line.endswith("\n") or ended:
                return line
            time.sleep(0.02)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def read(self) -> str:
        self._ended.wait()
        return self._file.read()

    # -- the process

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, input: None = None, timeout: float | None = None) -> tuple[str, None]:  # noqa: A002
        self.wait(timeout)
        out = self._file.read()
        self._file.close()
        self._tmp.cleanup()
        return out, None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class CliServer:
    """The test session's side: the one server process (`get`: None where it cannot fork safely,
    or LORA_EXP_TEST_PRELOAD=0), and a call run through it (`run`)."""

    #: environment variables the preloaded libraries read when imported: a call that sets them
    #: otherwise than the server's environment runs in a fresh process
    IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "CUDA", "TOKENIZERS",
                   "PYTHON", "SQLALCHEMY", "NUMPY", "OPENBLAS", "MLFLOW_LOGGING",
                   "MLFLOW_CONFIGURE_LOGGING", "MPL", "NLTK")
    _instance: "CliServer | None" = None
    _started = False
    _starting = threading.Lock()

    @classmethod
    def get(cls) -> "CliServer | None":
        """The server, started by the first call; calls from other threads meanwhile wait for it."""
        with cls._starting:
            if not cls._started:
                cls._started = True
                if os.environ.get("LORA_EXP_TEST_PRELOAD", "1") != "0" and hasattr(os, "fork"):
                    server = cls()
                    cls._instance = server if server.ready else None
        return cls._instance

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.lock = threading.Lock()  # one request at a time: the server answers each with its pid
        self.proc = subprocess.Popen([sys.executable, __file__],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        atexit.register(self.close)
        line = self.proc.stdout.readline()
        self.ready = bool(line) and json.loads(line).get("ready", False)
        self._pids: "queue.Queue[int]" = queue.Queue()
        self._exit_lock = threading.Lock()
        self._on_exit: dict[int, object] = {}
        self._exits: dict[int, int] = {}  # ended before their callback was registered
        if self.ready:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """The server's answers: pids to the caller waiting for one, exits to their process."""
        for line in self.proc.stdout:
            answer = json.loads(line)
            if "exit" not in answer:
                self._pids.put(answer["pid"])
                continue
            with self._exit_lock:
                callback = self._on_exit.pop(answer["pid"], None)
                if callback is None:
                    self._exits[answer["pid"]] = answer["exit"]
            if callback is not None:
                callback(answer["exit"])

    def start(self, request: dict, on_exit) -> int:
        """Fork the CLI process of `request`; `on_exit(code)` is called when it ends. Its pid."""
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._pids.get(timeout=60)
        with self._exit_lock:
            code = self._exits.pop(pid, None)
            if code is None:
                self._on_exit[pid] = on_exit
        if code is not None:
            on_exit(code)
        return pid

    def serves(self, args: tuple[str, ...], env: dict[str, str]) -> bool:
        if "-v" in args or "--verbose" in args:  # MLflow's loggers: their level is set when it is imported
            return False
        # a CLI that is not verbose sets MLFLOW_LOGGING_LEVEL=WARNING where it is unset (as an
        # in-process `main()` of a test leaves it in this process): the same MLflow either way
        env, mine = ({**e, "MLFLOW_LOGGING_LEVEL": e.get("MLFLOW_LOGGING_LEVEL", "WARNING")} for e in (env, self.env))
        keys = {k for k in {*env, *mine} if k.upper().startswith(self.IMPORT_TIME)}
        return all(env.get(k) == mine.get(k) for k in keys)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float):
        """As subprocess.run(capture_output=True, text=True, timeout=...)."""
        with tempfile.TemporaryDirectory(prefix="lora-exp-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            ended, codes = threading.Event(), []
            pid = self.start({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)},
                             lambda code: (codes.append(code), ended.set()))
            timed_out = not ended.wait(timeout)
            if timed_out:  # as subprocess.run: kill the process, then raise
                os.kill(pid, signal.SIGKILL)
                ended.wait()
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, codes[0], stdout, stderr)

    def popen(self, argv: list[str], cwd: Path, env: dict[str, str]) -> ServedProcess:
        return ServedProcess(self, argv, cwd, env)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    main()
