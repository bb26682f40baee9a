"""Fixtures of the integration tests: the sandbox exchange as a real process.

``sandbox_process`` starts one ``python -m services.sandbox`` for the whole
session (flow paused, seeded), and ``sandbox`` hands it to a test after putting
every fault knob back to its default, so tests can share the process. A test
that needs other start-up settings uses :class:`kumex_l3.testing.sandbox_proc.SandboxProcess`
itself.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator

import httpx
import pytest

from kumex_l3.testing.sandbox_proc import SANDBOX_TEST_ENV, SandboxProcess

#: Fault knobs as the shared sandbox started; restored before each test.
_DEFAULT_FAULTS = {
    "drop_rate": 0.0,
    "duplicate_rate": 0.0,
    "reorder_rate": 0.0,
    "delay_ms": 0.0,
    "delay_jitter_ms": 0.0,
    "disconnect_every_s": 0.0,
    "disconnect_every_max_s": 0.0,
    "outage_every_s": 0.0,
    "refuse_snapshots": False,
    "rest_error_status": None,
    "rest_error_until": 0.0,
    "rest_latency_ms": 5.0,
    "snapshot_rate_per_min": 0.0,
}


@pytest.fixture(scope="session")
def sandbox_process() -> Iterator[SandboxProcess]:
    """One sandbox process for the session (see ``SANDBOX_TEST_ENV``)."""
    with SandboxProcess(SANDBOX_TEST_ENV) as proc:
        yield proc


@pytest.fixture
def sandbox(
    sandbox_process: SandboxProcess, request: pytest.FixtureRequest
) -> Iterator[SandboxProcess]:
    """The shared sandbox with default faults and a paused flow; its log on failure."""
    with httpx.Client(base_url=sandbox_process.base_url, timeout=10.0) as client:
        client.post("/sandbox/faults", json=_DEFAULT_FAULTS).raise_for_status()
        client.post("/sandbox/flow/pause").raise_for_status()
        client.post("/sandbox/flow/rate", json={"rate": 0}).raise_for_status()
    yield sandbox_process
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(f"--- sandbox log ---\n{sandbox_process.log_text()}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report on the item (``rep_call``), for ``sandbox``."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
