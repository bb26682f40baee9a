"""Run every benchmark in turn (``make bench``); each prints its figures and baselines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["bench.bench_book", "bench.bench_replay", "bench.bench_pipeline", "bench.bench_read",
           "bench.bench_symbols", "bench.bench_trading", "bench.bench_availability"]


def main() -> int:
    for module in BENCHES:
        print(f"\n=== {module} ===", flush=True)
        code = subprocess.call([sys.executable, "-m", module, *sys.argv[1:]], cwd=ROOT)
        if code:
            print(f"{module} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
