"""The event loop every service runs on (``KUMEX_EVENT_LOOP``)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from kumex_l3.service import loop_factory, loop_name

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_asyncio_is_always_available() -> None:
    assert loop_name("asyncio") == "asyncio"
    loop = loop_factory("asyncio")()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed on this platform")
def test_auto_and_uvloop_run_on_uvloop() -> None:
    assert loop_name() == loop_name("auto") == loop_name("uvloop") == "uvloop"
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        module = runner.run(_loop_module())
    assert module.startswith("uvloop")


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop"):
        loop_name("trio")


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__
