"""``make bench``: every benchmark in one command, one table of what each measured.

Each ``bench/bench_*.py`` prints its own details and then its headline figures as ``BENCH | measure | value |
target`` lines; this runner makes the inputs they share once (a small synthetic cohort and a slice store, in a
temporary folder), runs them one after another as separate processes (so none inherits another's threads or page
cache state) and prints the collected lines as one markdown table with the machine it ran on. The GPU benchmark
runs only when CUDA is present; otherwise the table says so.

    python bench/run_all.py [--quick]
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def run_bench(script: str, arguments: list[str]) -> tuple[list[list[str]], float]:
    """Run one benchmark; → (its ``BENCH`` rows as [measure, value, target], seconds it took)."""
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(BENCH / script), *arguments], capture_output=True,
                               text=True, encoding="utf-8", check=False)
    seconds = time.perf_counter() - started
    sys.stderr.write(completed.stdout)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return [[f"{script} failed", last, ""]], seconds
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in completed.stdout.splitlines()
            if line.startswith("BENCH |")]
    return rows, seconds


def machine_line() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPU cores, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a rough table in ~3 minutes)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="braindino_bench_") as scratch:
        cohort, store = Path(scratch) / "cohort", Path(scratch) / "store"
        subprocess.run([sys.executable, "-m", "braindino.cli", "synth", "--out", str(cohort), "--subjects", "4",
                        "--seed", "3", "--resolution", "2"], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "braindino.cli", "prepare", "--manifest", str(cohort / "manifest.csv"),
                        "--out", str(store)], check=True, capture_output=True)
        steps = "8" if args.quick else "20"
        plan = [
            ("bench_store.py", ["--subjects", "2" if args.quick else "4", "--reads", "20000"]),
            ("bench_loader.py", ["--store", str(store), "--steps", steps]),
            ("bench_augment.py", ["--iters", "2" if args.quick else "5"]),
            ("bench_step_overhead.py", ["--store", str(store), "--steps", "10" if args.quick else "15",
                                        "--repeats", "1" if args.quick else "3"]),
            ("bench_extract.py", ["--manifest", str(cohort / "manifest.csv"),
                                  "--repeats", "1" if args.quick else "3"]),
            ("bench_probe.py", ["--volumes", "300" if args.quick else "1000"]),
        ]
        if torch.cuda.is_available():
            plan.append(("bench_gpu_throughput.py", ["--steps", steps]))
        table, timings = [], []
        for script, arguments in plan:
            print(f"running {script} ...", file=sys.stderr, flush=True)
            rows, seconds = run_bench(script, arguments)
            table.extend([script, *row] for row in rows)
            timings.append(f"{script} {seconds:.0f}s")
    if not torch.cuda.is_available():
        table.append(["bench_gpu_throughput.py", "GPU img/s, MFU, peak memory (ViT-S/16, ViT-B/16)",
                      "not measured: no CUDA GPU on this machine", "≥ 1,000 img/s per H200 (ViT-B/16)"])
    print(f"machine: {machine_line()}\n")
    print("| benchmark | measure | value | target |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print(f"\n({', '.join(timings)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
