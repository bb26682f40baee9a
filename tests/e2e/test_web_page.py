"""The live web page in headless Chromium: it updates, matches GET /book, marks own orders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from kumex_l3 import keys
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, KcAuth, SandboxProcess
from tests.browser import Browser, find_chromium

SYM = "XBTUSDM"
LADDER_JS = """
[...document.querySelectorAll('#ladder tbody tr.ask, #ladder tbody tr.bid')].map(tr => {
  const td = tr.querySelectorAll('td');
  return [tr.classList.contains('ask') ? 'ask' : 'bid', td[1].textContent,
          td[2].textContent, Number(td[3].textContent), td[0].textContent];
})
"""

pytestmark = pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"),
                                reason="chromium is not installed (the CI set-up installs it)")


@pytest.fixture
def stack(redis_url: str) -> Iterator[tuple[SandboxProcess, ServiceProcess]]:
    env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "40", "SANDBOX_SEED": "5",
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0"}
    with SandboxProcess(env) as sandbox, ServiceProcess("services.feed", {
            "REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "KUMEX_BASE_URL": sandbox.base_url,
            "FEED_HTTP_HOST": "127.0.0.1", "FEED_SNAPSHOT_PER_MIN": "0"},
            port_var="FEED_HTTP_PORT"), ServiceProcess("services.book", {
            "REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "BOOK_HOST": "127.0.0.1"},
            port_var="BOOK_PORT") as book:
        yield sandbox, book


def test_page_shows_the_live_ladder(stack: tuple[SandboxProcess, ServiceProcess],
                                    redis_url: str, tmp_path: Path) -> None:
    sandbox, book = stack
    wait_for(lambda: httpx.get(f"{book.url}/book/{SYM}", timeout=5).status_code == 200,
             "a synced book")
    # An own order deep in the bids (nobody trades there), recorded in Redis the
    # way the order monitor records it.
    best = httpx.get(f"{book.url}/book/{SYM}", params={"depth": 1}, timeout=5).json()
    price = f"{float(best['bids'][0][0]) - 1.2:.1f}"
    with httpx.Client(base_url=sandbox.base_url, auth=KcAuth(DEMO_KEY_1)) as http:
        placed = http.post("/api/v1/orders", json={
            "clientOid": "page-coid", "side": "buy", "symbol": SYM, "type": "limit",
            "price": price, "size": 3, "leverage": "5"}).json()
    mine = placed["data"]["orderId"]
    r = redis.Redis.from_url(redis_url)
    r.sadd(keys.orders_active(SYM), "page-coid")
    r.hset(keys.order(SYM, "page-coid"), mapping={"orderId": mine})
    r.close()

    with Browser() as browser:
        page = browser.page(f"{book.url}/#{SYM}")
        def shown(element: str) -> str:
            return str(page.evaluate(f"document.getElementById('{element}')?.textContent"))

        def sequence() -> int:
            text = shown("sequence")
            return int(text) if text.isdigit() else -1

        wait_for(lambda: shown("state") == "SYNCED", "the page to show SYNCED")
        first = sequence()
        wait_for(lambda: sequence() > first, "the ladder to update live")
        with httpx.Client(base_url=sandbox.base_url) as http:
            http.post("/sandbox/flow/pause").raise_for_status()
            seq = int(http.get("/sandbox/state").json()["sequences"][SYM])
        wait_for(lambda: sequence() == seq, "the page to reach the last sequence")
        body = httpx.get(f"{book.url}/book/{SYM}", params={"depth": 20}, timeout=5).json()
        rows = page.evaluate(LADDER_JS)
        asks = [[p, s, n] for side, p, s, n, _ in rows if side == "ask"]
        bids = [[p, s, n] for side, p, s, n, _ in rows if side == "bid"]
        assert asks == body["asks"][::-1] and bids == body["bids"]
        pos = httpx.get(f"{book.url}/book/{SYM}/orders/{mine}", timeout=5).json()
        assert pos["price"] == price
        # The book re-reads own orders every second: the mark follows.
        wait_for(lambda: [p for _, p, _, _, mark in page.evaluate(LADDER_JS) if mark == "★"]
                 == [price], "the own order to be marked on the ladder")
        own_panel = page.evaluate("document.getElementById('own')?.innerText")
        assert price in own_panel and str(pos["position"]) in own_panel
        # KUMEX_SCREENSHOTS=dir keeps the picture (to look at it, or as a CI artifact).
        shot = page.screenshot(Path(os.environ.get("KUMEX_SCREENSHOTS", tmp_path)) /
                               "book-page.png")
        assert shot.stat().st_size > 10_000
        page.close()
