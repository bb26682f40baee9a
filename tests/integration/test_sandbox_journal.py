"""The sandbox's journal: every engine message, before faults, for rebuilding the truth."""

from __future__ import annotations

import httpx

from kumex_l3 import OrderBook, parse_message
from kumex_l3.testing.sandbox_proc import SandboxProcess


def test_journal_rebuilds_the_engine_book_despite_drop_faults() -> None:
    env = {"SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "3", "SANDBOX_START_SEQUENCE": "100",
           "SANDBOX_JOURNAL_SIZE": "100000", "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0",
           "SANDBOX_DROP_RATE": "0.5"}
    with SandboxProcess(env) as sandbox, httpx.Client(base_url=sandbox.base_url) as http:
        http.post("/sandbox/step", json={"n": 50}).raise_for_status()
        start = http.get("/sandbox/snapshot/XBTUSDM").json()
        http.post("/sandbox/step", json={"n": 2000}).raise_for_status()
        body = http.get("/sandbox/journal/XBTUSDM", params={"after": start["sequence"]}).json()
        texts = body["messages"]
        assert texts, "the flow produced no XBTUSDM message"
        book = OrderBook.from_snapshot(start)
        for text in texts:  # raises SequenceGap if the journal lost anything
            book.apply(parse_message(text))
        engine = http.get("/sandbox/book/XBTUSDM").json()
        assert book.sequence == engine["sequence"]
        bids, asks = book.l3()
        assert [lv.text for lv in bids] == [lv["price"] for lv in engine["bids"]]
        assert [[o.order_id for o in lv.orders] for lv in asks] == [
            [o["orderId"] for o in lv["orders"]] for lv in engine["asks"]]
        # Paging and bad input.
        page = http.get("/sandbox/journal/XBTUSDM",
                        params={"after": start["sequence"], "limit": 3}).json()
        assert page["messages"] == texts[:3]
        assert http.get("/sandbox/journal/XBTUSDM", params={"after": "x"}).status_code == 400
        assert http.get("/sandbox/journal/NOPE").status_code == 404
