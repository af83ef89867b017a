"""What a user waits for at the terminal: `lora-exp train` in a fresh process, from exec to its
first line, its last line and its exit, with and without a new MLflow store; and a bad input's
refusal. Each command runs through the installed console script (`lora_exp.cli:entry`) and, as
the baseline in the same run, through `sys.exit(main())` (the console script before it ended the
process itself: the interpreter's own teardown after the last line).

    python bench/cli_latency.py [--repeat 2]

Prints one JSON line per command and way, the medians over the repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXE = Path(sys.executable).parent / "lora-exp"
TINY = ["model=tiny_gpt2", "data=seed", "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.max_new_tokens=4"]
BASELINE = "import sys; from lora_exp.cli import main; sys.argv[0] = 'lora-exp'; sys.exit(main())"


def timed(command: list[str], cwd: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = last = None
    for _ in proc.stdout:
        last = time.perf_counter() - start
        first = first if first is not None else last
    proc.wait()
    end = time.perf_counter() - start
    return {"first_line_s": first, "last_line_s": last, "exit_s": end, "after_last_line_s": end - (last or end),
            "rc": proc.returncode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    commands = {
        "train, tracking=none": ["train", *TINY, "tracking=none"],
        "train, a new MLflow store": ["train", *TINY, "tracking.uri=sqlite:///{tmp}/mlflow.db",
                                      "tracking.artifact_root={tmp}/artifacts"],
        "bad input (sweep pack=banana)": ["sweep", "pack=banana"],
    }
    ways = {"console script": [str(EXE)], "baseline: sys.exit(main())": [sys.executable, "-c", BASELINE]}
    for label, cli_args in commands.items():
        for way, prefix in ways.items():
            runs = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(timed(prefix + [a.format(tmp=tmp) for a in cli_args], tmp))
            row = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0] if key != "rc"}
            print(json.dumps({"what": label, "how": way, "repeats": args.repeat, **row,
                              "exit_codes": sorted({r["rc"] for r in runs})}), flush=True)


if __name__ == "__main__":
    main()
