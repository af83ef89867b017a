"""Why a packed worker writes to MLflow/Optuna from another *process*, not a thread.

A training loop launches thousands of small operators a step; each releases the GIL and takes it
back. With one busy Python thread beside it (what a tracking thread doing SQLAlchemy work is), every
take-back can wait for the interpreter's switch interval. Prints both timings.

    python bench/gil_contention.py
"""
import threading
import time

import torch


def ops(x: torch.Tensor, n: int = 3000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    return time.perf_counter() - start


def main() -> None:
    x = torch.zeros(16)
    alone = ops(x)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(i * i for i in range(1000))

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        beside = ops(x)
    finally:
        stop.set()
        thread.join()
    print(f"3000 small torch ops: {alone:.3f} s alone, {beside:.3f} s with one busy Python thread beside them "
          f"({beside / alone:.0f}x)")


if __name__ == "__main__":
    main()
