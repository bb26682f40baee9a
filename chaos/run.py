"""``python -m chaos.run [--quick] [--soak-minutes N]``: every chaos scenario, one table.

Runs, in order (``--only`` picks some):

* ``crash``: kill -9 of each service in turn, Redis restarted with append-only
  persistence, then without (:func:`chaos.scenarios.crash_suite`);
* ``network``: disconnects, no pong, snapshots refused, snapshot 429s, REST
  500s (60 s; 12 s with ``--quick``), Redis down (30 s; 10 s), then the RSS
  bound (:func:`chaos.scenarios.network_suite`);
* ``cluster``: the whole set on a local Redis Cluster (three masters, one
  replica each), the master serving the symbol's slot killed ``--failovers``
  times (5; 1 with ``--quick``), the killed node back as a replica each time
  (:func:`chaos.scenarios.cluster_suite`);
* ``pytest``: the rest of ``tests/chaos/`` (bad input, fuzzing, HTTP abuse,
  secrets, a hostile account, fencing, hostile peers...) through pytest, with
  ``KUMEX_FUZZ_EXAMPLES`` raised (5000; the tests' own defaults with
  ``--quick``) and the owners paused 5, 15 and 40 s (``KUMEX_CHAOS_PAUSES``;
  5 and 15 with ``--quick``); each failed test is a violation;
* ``atheris``: the coverage-guided parser fuzzer of ``tests/chaos`` for
  ``--atheris-seconds`` (60; not with ``--quick``) when atheris is installed
  (``pip install -e '.[fuzz]'``); a crash it finds is a violation;
* ``soak``: ~5,000 messages a second through the whole set for
  ``--soak-minutes`` (10; none with ``--quick``), checked against the journal;
* ``availability``: three symbols at the real venue's limits (1 snapshot a
  minute, every connection cut after 30-60 s, 0.1 % dropped per connection),
  two feeds with two lines each, kill -9 of the writing feed, for
  ``--availability-minutes`` (10; not with ``--quick``): each symbol must
  answer 200 in 99.9 % of its seconds (:mod:`chaos.availability`);
* ``outage``: a venue-wide outage of 5 s at 1 snapshot a minute: every symbol
  back in the order the scheduler announced (not with ``--quick``).

``--quick`` is the CI-sized set (what ``tests/chaos/test_crash_restart.py``
and ``test_network_faults.py`` run). Prints each scenario's report as it
ends, then a table of the faults injected and the invariants checked with
their violations; exits 1 on any violation (0 when there is none).
``--json FILE`` also writes every outcome as JSON. Everything runs on
127.0.0.1, on a Redis of its own: never the one on port 6379.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from chaos import availability, scenarios
from chaos.scenarios import FULL, QUICK, Outcome
from chaos.stack import Check

__all__ = ["main", "table"]

ROOT: Final = Path(__file__).resolve().parent.parent
#: The test files that run the scenarios of this package (not run again through pytest).
_OWN_TESTS: Final = ("tests/chaos/test_crash_restart.py", "tests/chaos/test_network_faults.py")
_PARTS: Final = ("crash", "network", "cluster", "pytest", "atheris", "soak", "availability",
                  "outage")
_ATHERIS_SCRIPT: Final = "tests/chaos/fuzz_parser_atheris.py"
_FAULT_WIDTH: Final = 58
_NAME_WIDTH: Final = 34


def _pytest_outcomes(fuzz_examples: int | None, quick: bool) -> list[Outcome]:
    """The other tests of ``tests/chaos`` through pytest: one outcome per file."""
    env = dict(os.environ)
    if fuzz_examples is not None:
        env["KUMEX_FUZZ_EXAMPLES"] = str(fuzz_examples)
    if not quick:
        env.setdefault("KUMEX_CHAOS_PAUSES", "5,15,40")  # tests/chaos/test_fencing.py
    with tempfile.TemporaryDirectory(prefix="kumex-chaos-") as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "tests/chaos", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", *(f"--ignore={path}" for path in _OWN_TESTS)]
        started = time.monotonic()
        print(f"==> {' '.join(command[2:])}"
              + (f" (KUMEX_FUZZ_EXAMPLES={fuzz_examples})" if fuzz_examples else ""), flush=True)
        code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
        elapsed = time.monotonic() - started
        files: dict[str, dict[str, Any]] = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                name = (case.get("classname") or "?").split(".")
                module = next((p for p in name if p.startswith("test_")), ".".join(name))
                row = files.setdefault(module, {"tests": 0, "failed": [], "skipped": 0,
                                                "seconds": 0.0})
                row["tests"] += 1
                row["seconds"] += float(case.get("time") or 0)
                if case.find("failure") is not None or case.find("error") is not None:
                    row["failed"].append(case.get("name") or "?")
                elif case.find("skipped") is not None:
                    row["skipped"] += 1
    outcomes = []
    examples = f"KUMEX_FUZZ_EXAMPLES={fuzz_examples}" if fuzz_examples else "CI defaults"
    for module, row in sorted(files.items()):
        check = Check("tests pass")
        check.ok(row["tests"] - len(row["failed"]) - row["skipped"])
        for failed in row["failed"]:
            check.fail(f"failed: {failed}")
        outcomes.append(Outcome(f"pytest {module}", {f"{row['tests']} tests ({examples})": 1},
                                [check], {"skipped": row["skipped"]}, row["seconds"]))
    if code not in (0, 1, 5) or (code == 1 and not any(o.violations for o in outcomes)):
        check = Check("pytest ran")
        check.fail(f"pytest exited with status {code}")
        outcomes.append(Outcome("pytest tests/chaos", {}, [check], {}, elapsed))
    if not quick and code == 5:
        print("(no other test in tests/chaos)", flush=True)
    return outcomes


def _atheris_outcome(seconds: int) -> Outcome:
    """``tests/chaos/fuzz_parser_atheris.py`` for ``seconds``: one outcome, one invariant."""
    check = Check("no crash found by libFuzzer")
    name = f"atheris parser fuzzing {seconds} s"
    if not (ROOT / _ATHERIS_SCRIPT).exists():
        return Outcome(name, {"skipped: no fuzz script": 1}, [check])
    if importlib.util.find_spec("atheris") is None:
        return Outcome(name, {"skipped: atheris not installed (pip install -e '.[fuzz]')": 1},
                       [check])
    started = time.monotonic()
    print(f"==> {_ATHERIS_SCRIPT} -max_total_time={seconds}", flush=True)
    # Kept when libFuzzer writes a crashing input there; removed after a clean run.
    artifacts = Path(tempfile.mkdtemp(prefix="kumex-atheris-"))
    done = subprocess.run(
        [sys.executable, str(ROOT / _ATHERIS_SCRIPT), f"-max_total_time={seconds}",
         f"-artifact_prefix={artifacts}/"], cwd=ROOT, capture_output=True, text=True,
        check=False, timeout=seconds + 300)
    output = done.stdout + done.stderr
    runs = 0
    for line in output.splitlines():
        if line.startswith("Done ") and " runs " in line:
            runs = int(line.split()[1])
    if done.returncode == 0:
        check.ok()
        shutil.rmtree(artifacts, ignore_errors=True)
    else:
        tail = " | ".join(output.strip().splitlines()[-5:])
        check.fail(f"exit status {done.returncode} (inputs kept in {artifacts}): {tail[:500]}")
    return Outcome(name, {f"{runs} generated inputs": 1}, [check], {},
                   time.monotonic() - started)


def _faults_text(outcome: Outcome) -> str:
    parts = [name if n == 1 else f"{name} x{n}" for name, n in outcome.faults.items()]
    return ", ".join(parts) or "-"


def table(outcomes: Sequence[Outcome]) -> str:
    """The summary table: scenario, faults injected, invariants, checked, violations."""
    head = (f"{'scenario':<{_NAME_WIDTH}} {'faults injected':<{_FAULT_WIDTH}} "
            f"{'invariants':>10} {'checked':>8} {'violations':>10}")
    rule = "-" * len(head)
    lines = [rule, head, rule]
    for outcome in outcomes:
        faults = textwrap.wrap(_faults_text(outcome), _FAULT_WIDTH) or ["-"]
        names = textwrap.wrap(outcome.scenario, _NAME_WIDTH) or ["?"]
        for i in range(max(len(faults), len(names))):
            name = names[i] if i < len(names) else ""
            fault = faults[i] if i < len(faults) else ""
            if i == 0:
                lines.append(f"{name:<{_NAME_WIDTH}} {fault:<{_FAULT_WIDTH}} "
                             f"{len(outcome.checks):>10} {outcome.checked:>8} "
                             f"{outcome.violations:>10}")
            else:
                lines.append(f"{name:<{_NAME_WIDTH}} {fault:<{_FAULT_WIDTH}}")
    lines.append(rule)
    total_v = sum(o.violations for o in outcomes)
    lines.append(f"{'TOTAL':<{_NAME_WIDTH}} {f'{len(outcomes)} scenarios':<{_FAULT_WIDTH}} "
                 f"{sum(len(o.checks) for o in outcomes):>10} "
                 f"{sum(o.checked for o in outcomes):>8} {total_v:>10}")
    lines.append(rule)
    return "\n".join(lines)


def _print(outcome: Outcome) -> None:
    print(outcome.report(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI-sized set (no soak)")
    parser.add_argument("--soak-minutes", type=float, default=None,
                        help="soak length (default 10; 0 with --quick)")
    parser.add_argument("--soak-rate", type=float, default=2450.0,
                        help="flow actions a second in the soak (~2 messages each)")
    parser.add_argument("--fuzz-examples", type=int, default=None,
                        help="KUMEX_FUZZ_EXAMPLES for tests/chaos (default 5000; "
                             "the tests' own with --quick)")
    parser.add_argument("--atheris-seconds", type=int, default=60,
                        help="length of the atheris run (not run with --quick)")
    parser.add_argument("--availability-minutes", type=float, default=10.0,
                        help="length of the availability run (not run with --quick)")
    parser.add_argument("--failovers", type=int, default=None,
                        help="Redis Cluster master kills in the cluster part (default 5; 1 "
                             "with --quick)")
    parser.add_argument("--only", default=",".join(_PARTS),
                        help=f"comma-separated parts among {','.join(_PARTS)}")
    parser.add_argument("--json", type=Path, default=None, help="write the outcomes here")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in _PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {','.join(_PARTS)}")
    size = QUICK if args.quick else FULL
    soak_minutes = args.soak_minutes if args.soak_minutes is not None else (
        0.0 if args.quick else 10.0)
    fuzz = args.fuzz_examples if args.fuzz_examples is not None else (
        None if args.quick else 5000)
    started = datetime.now(UTC)
    print(f"==> chaos ({size.name}) started {started:%Y-%m-%d %H:%M:%S} UTC; parts: "
          f"{','.join(parts)}; soak {soak_minutes:g} min", flush=True)
    outcomes: list[Outcome] = []
    if "crash" in parts:
        outcomes += scenarios.crash_suite(size, on_outcome=_print)
    if "network" in parts:
        outcomes += scenarios.network_suite(size, on_outcome=_print)
    if "cluster" in parts:
        outcomes += scenarios.cluster_suite(size, args.failovers or (1 if args.quick else 5),
                                            on_outcome=_print)
    if "pytest" in parts:
        outcomes += _pytest_outcomes(fuzz, args.quick)
    if "atheris" in parts and not args.quick and args.atheris_seconds > 0:
        outcome = _atheris_outcome(args.atheris_seconds)
        _print(outcome)
        outcomes.append(outcome)
    if "soak" in parts and soak_minutes > 0:
        outcome = scenarios.soak(soak_minutes, rate=args.soak_rate)
        _print(outcome)
        outcomes.append(outcome)
    if "availability" in parts and not args.quick and args.availability_minutes > 0:
        outcome, _ = availability.availability(availability.AvailabilityConfig(
            minutes=args.availability_minutes))
        _print(outcome)
        outcomes.append(outcome)
    if "outage" in parts and not args.quick:
        outcome = availability.outage()
        _print(outcome)
        outcomes.append(outcome)
    print(table(outcomes))
    violations = sum(o.violations for o in outcomes)
    print(f"chaos ({size.name}): {violations} violation(s); "
          f"{(datetime.now(UTC) - started).total_seconds():.0f} s", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "started": started.isoformat(), "size": size.name, "violations": violations,
            "outcomes": [asdict(o) for o in outcomes]}, indent=2, default=str))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
