"""What tests share besides fixtures: paths, the tiny configuration, the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

#: a tiny, fast configuration: random 2-layer GPT-2, the seed's five texts.
TINY = ["model=tiny_gpt2", "data=seed", "trainer.max_steps=30", "trainer.batch_size=5", "trainer.lr=1e-2",
        "trainer.eval_steps=10", "trainer.max_new_tokens=8", "trainer.warmup_steps=0",
        "trainer.generation_metrics=[exact_match,token_f1,rouge_l]"]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """The installed entry point in its own process: real exit codes, real stderr. The process is
    a fork of a server that has imported torch and transformers once (`cli_server.py`), or a
    fresh one where that could change what the call does (see there) or the server is busy."""
    exe = str(Path(sys.executable).parent / "lora-exp")
    full_env = {**os.environ, **(env or {})}
    server = _CliServer.get()
    if server is not None and server.serves(args, full_env) and server.lock.acquire(blocking=False):
        try:
            return server.run([exe, *args], Path(cwd), full_env, timeout)
        finally:
            server.lock.release()
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


class _CliServer:
    """The one `cli_server.py` process of a test session (None where it cannot fork safely, or
    LORA_EXP_TEST_PRELOAD=0)."""

    #: environment variables the preloaded libraries read when imported: a call that sets them
    #: otherwise than the server's environment runs in a fresh process
    IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "CUDA", "TOKENIZERS",
                   "PYTHON", "SQLALCHEMY", "NUMPY", "OPENBLAS")
    _instance: "_CliServer | None" = None
    _started = False

    @classmethod
    def get(cls) -> "_CliServer | None":
        if not cls._started:
            cls._started = True
            if os.environ.get("LORA_EXP_TEST_PRELOAD", "1") != "0" and hasattr(os, "fork"):
                server = cls()
                cls._instance = server if server.ready else None
        return cls._instance

    def __init__(self) -> None:
        import atexit
        import json
        import threading

        self.env = dict(os.environ)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))],
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
        import json
        import signal
        import tempfile
        import threading

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


def load_study(storage: str, name: str = "tiny"):
    """The Optuna study as the sweep left it."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def sweep_runs(store: str):
    """(client, parent runs, trial runs) of the default experiment of an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("lora_exp.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("lora_exp.kind") == "trial"]
    return client, parents, children
