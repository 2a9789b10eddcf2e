"""`make bench`: run the benchmarks, write results/*.json, regenerate benchmarks/README.md with plots.

    python -m benchmarks.run                      # every benchmark, full size
    python -m benchmarks.run --only teacher_http  # one of them
    python -m benchmarks.run --size tiny          # smoke size: results/smoke/ and its own README

At full size each benchmark starts its own local Ray (none measures another's leftovers); the tiny size
shares one (4 logical CPUs, what the benchmarks ask for), whose start-up would otherwise be a large share of
each tiny benchmark's time.
"""

from __future__ import annotations

import argparse
import importlib
import time

import ray

from benchmarks.common import RESULTS, save
from benchmarks.report import write_readme
from dnc_ray.infra.cluster import init_ray

BENCHMARKS = ["teacher_http", "hf_batch", "serving", "training", "cost", "rate_limits", "vllm_engine"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    args = parser.parse_args(argv)
    shared_ray = args.size == "tiny"
    if shared_ray:
        init_ray(num_cpus=4)  # each benchmark's own init_ray then joins this one
    for name in args.only:
        print(f"[bench] {name} ({args.size}) ...", flush=True)
        started = time.monotonic()
        result = importlib.import_module(f"benchmarks.{name}").run(args.size)
        print(f"[bench] {name}: wrote {save(name, args.size, result)} ({time.monotonic() - started:.0f} s)", flush=True)
        if not shared_ray:
            ray.shutdown()  # each benchmark starts the local Ray it needs
    ray.shutdown()
    print(f"[bench] wrote {write_readme(RESULTS if args.size == 'full' else RESULTS / 'smoke')}")


if __name__ == "__main__":
    main()
