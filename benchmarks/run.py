"""`make bench`: run the benchmarks, write results/*.json, regenerate benchmarks/README.md with plots.

    python -m benchmarks.run                      # every benchmark, full size
    python -m benchmarks.run --only teacher_http  # one of them
    python -m benchmarks.run --size tiny          # smoke size: results/smoke/ and its own README
"""

from __future__ import annotations

import argparse
import importlib

import ray

from benchmarks.common import RESULTS, save
from benchmarks.report import write_readme

BENCHMARKS = ["teacher_http", "hf_batch", "serving", "training", "cost", "rate_limits"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    args = parser.parse_args(argv)
    for name in args.only:
        print(f"[bench] {name} ({args.size}) ...", flush=True)
        result = importlib.import_module(f"benchmarks.{name}").run(args.size)
        print(f"[bench] {name}: wrote {save(name, args.size, result)}", flush=True)
        ray.shutdown()  # each benchmark starts the local Ray it needs
    print(f"[bench] wrote {write_readme(RESULTS if args.size == 'full' else RESULTS / 'smoke')}")


if __name__ == "__main__":
    main()
