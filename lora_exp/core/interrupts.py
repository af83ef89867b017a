"""Ctrl-C and SIGTERM, raised where they cannot break the stores that record the stop.

Python raises KeyboardInterrupt at whatever bytecode the main thread runs when a signal lands. Two
places are unsafe:

- **inside a database call** (SQLAlchemy, under MLflow's and Optuna's stores): the interrupted
  statement's cursor lives on in the exception's traceback, and with it its sqlite lock, so every
  write that records the stop (the trial's run FAILED, the sweep's parent KILLED) waits 20 s and
  fails with "database is locked";
- **inside a `__del__`** (a finalizer the collector runs wherever it runs: the `regex` module's,
  during ROUGE scoring, say): Python prints "Exception ignored" with a traceback and goes on,
  and the stop is lost;
- **inside the thread machinery** (`threading`, `concurrent.futures`): a thread pool's first
  `submit` (MLflow's artifact repository's, as a trial starts) starts a worker thread and then
  registers it for Python's exit, which wakes the registered ones; a stop between the two left a
  thread that nothing wakes, and the process waited for it at exit forever (a worker of a sweep
  sent SIGTERM, and the sweep with it). A stop inside a `Condition`'s wait can also leave its
  lock released twice ("release unlocked lock").

So a stop that lands while the main thread runs SQLAlchemy's code, a finalizer or the thread
machinery's code (the handler's frame and its callers say so) is held until that call is over,
then raised: the signal is re-sent to the main thread every few milliseconds, and its handler
looks again at where it lands. And a stop once raised is raised again by `check()`, which the
training, evaluation and pack loops call at each step, in case a library swallowed it.

The CLI's main runs every command in `answering()`: both signals stop it now. A command with its
own answer (a sweep: the first Ctrl-C finishes the trial in flight) nests its own `answering()`."""
from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

#: how often a held stop is re-sent to the main thread
RETRY_S = 0.02

_answer: Callable[[int, Any], None] | None = None
_pending = False  # a stop decided while the main thread was inside a database call or a finalizer
_stopping = False  # a stop raised: `check()` raises it again if something swallowed it
_retrying = False
_depth = 0


@contextlib.contextmanager
def answering(answer: Callable[[int, Any], None] | None = None) -> Iterator[None]:
    """While this runs, SIGINT and SIGTERM go to `answer(signum, frame)`, which calls
    `stop_now(frame)` to stop; without an answer, both stop now. Main thread only."""
    global _answer, _depth, _pending, _stopping
    previous, _answer = _answer, answer
    _depth += 1
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _answer, _depth = previous, _depth - 1
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if not _depth:  # the command is over (main() may be called again in this process)
            _pending = _stopping = False


def stop_now(frame: Any = None) -> None:
    """Raise KeyboardInterrupt here, or, inside a database call or a finalizer (`unsafe`), as
    soon as it returns.
    `frame`: where the signal landed (a handler's argument); by default the caller's."""
    global _pending, _stopping
    if unsafe(frame if frame is not None else sys._getframe(1)):
        _pending = True
        _start_retry()
        return
    _pending = False
    _stopping = True
    raise KeyboardInterrupt


def check() -> None:
    """Where a loop can stop between steps: a stop raised earlier and swallowed is raised again."""
    if _stopping:
        raise KeyboardInterrupt


def stopping() -> bool:
    return _stopping


def unsafe(frame: Any) -> bool:
    """`frame`, or a caller of it, is SQLAlchemy's (under MLflow's and Optuna's stores), a
    finalizer's (`__del__`) or the thread machinery's: no place to raise a stop."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if (frame.f_code.co_name == "__del__" or module == "threading"
                or module.startswith(("sqlalchemy", "concurrent.futures"))):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: Any) -> None:
    if _stopping and signum == signal.SIGTERM:
        return  # stopping already: a second SIGTERM (a process group's, then a forwarded one) cuts no cleanup short
    if _pending:  # a held stop, or another signal meanwhile: stop as soon as it is safe
        stop_now(frame)
    elif _answer is not None:
        _answer(signum, frame)
    else:
        stop_now(frame)


def _start_retry() -> None:
    global _retrying
    if _retrying:
        return
    _retrying = True
    threading.Thread(target=_retry, daemon=True, name="lora-exp-stop").start()


def _retry() -> None:
    """Re-send the held stop to the main thread until it is raised: its handler (`_on_signal`)
    decides there, from the stack it interrupts, so no race with the next database call."""
    global _retrying
    try:
        while _pending:
            time.sleep(RETRY_S)
            if _pending:
                _thread.interrupt_main(signal.SIGINT)
    finally:
        _retrying = False
