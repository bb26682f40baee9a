"""Prometheus metrics of the book service, on a registry of its own (``kumex_book_*``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kumex_l3.metrics import make_registry
from kumex_l3.sync import SyncStats

__all__ = ["BookMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Fine buckets for the exchange-to-book delay: the market-data path's latency budget.
_APPLY_DELAY_BUCKETS = (0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005,
                        0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class BookMetrics:
    """Every metric of one book service instance (one registry per instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else make_registry()
        r = self.registry
        sym = ["symbol"]
        self.messages = Counter("kumex_book_messages", "Stream messages read", sym, registry=r)
        self.applied = Counter("kumex_book_messages_applied", "Messages applied to the book",
                               sym, registry=r)
        self.ignored = Counter("kumex_book_messages_ignored",
                               "Messages ignored as already applied (duplicates, replays)",
                               sym, registry=r)
        self.dropped = Counter("kumex_book_messages_dropped",
                               "Buffered messages dropped because a snapshot held them",
                               sym, registry=r)
        self.refused = Counter("kumex_book_messages_refused",
                               "Input refused and sent to the DLQ", sym, registry=r)
        self.stream_read_refusals = Counter(
            "kumex_book_stream_read_refusals",
            "Times Redis refused to read the symbol's stream (its key holds another type): "
            "left out of the replica's read until it is a stream again", sym, registry=r)
        self.stream_reads = Counter(
            "kumex_book_stream_reads",
            "Round trips of the replica's stream reader (one XREAD over every book it keeps, "
            "and its follow-up)", registry=r)
        self.overflow = Counter("kumex_book_buffer_overflow",
                                "Buffered messages lost to the buffer bound", sym, registry=r)
        self.gaps = Counter("kumex_book_gaps", "Sequence gaps seen", sym, registry=r)
        self.resyncs = Counter("kumex_book_resyncs", "Times a synced book was lost", sym,
                               registry=r)
        self.feed_disconnects = Counter(
            "kumex_book_feed_disconnects",
            "ctl=disconnected entries read (the feed lost the exchange: book not served "
            "until shown current)", sym, registry=r)
        self.feed_silences = Counter(
            "kumex_book_feed_silent",
            "Times the feed's heartbeat (kumex:{SYM}:feed) was found lapsed while the book was "
            "served (book not served until shown current)", sym, registry=r)
        self.snapshot_requests = Counter("kumex_book_snapshot_requests",
                                         "Snapshot requests published to the feed", sym,
                                         registry=r)
        self.snapshots_used = Counter("kumex_book_snapshots_used",
                                      "Snapshots the book was rebuilt from", sym, registry=r)
        self.checkpoints = Counter("kumex_book_checkpoints", "Checkpoints written", sym,
                                   registry=r)
        self.checkpoint_restores = Counter("kumex_book_checkpoint_restores",
                                           "Starts from a checkpoint", sym, registry=r)
        self.lag_messages = Gauge("kumex_book_stream_lag_messages",
                                  "Sequence of the stream's newest message minus the book's",
                                  sym, registry=r)
        self.lag_ms = Gauge("kumex_book_stream_lag_milliseconds",
                            "Age of the oldest stream entry not yet consumed (0 when caught up)",
                            sym, registry=r)
        self.synced = Gauge("kumex_book_synced", "1 while the book is synced and served", sym,
                            registry=r)
        self.owned = Gauge("kumex_book_owned", "1 while this replica holds the symbol's lease",
                           sym, registry=r)
        self.sequence = Gauge("kumex_book_sequence", "Sequence of the local book", sym,
                              registry=r)
        self.apply_delay = Histogram(
            "kumex_book_apply_delay_seconds",
            "From the exchange's ts of a message to the end of the batch that applied it "
            "(every message of a small batch, a systematic sample of at most ~200 of a big one)",
            sym, buckets=_APPLY_DELAY_BUCKETS, registry=r)
        self.receipt_delay = Histogram(
            "kumex_book_receipt_delay_seconds",
            "From the feed's append of a stream entry (its id: Redis's clock, whole "
            "milliseconds, so up to 1 ms over) to the end of the batch that read it "
            "(sampled as the apply delay)", sym, buckets=_APPLY_DELAY_BUCKETS, registry=r)
        self.http_latency = Histogram("kumex_book_http_request_duration_seconds",
                                      "HTTP request latency", ["method", "route", "status"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        #: Requests answered by the fast route, per route template: plain integers (a
        #: Counter's lock is a visible part of such a request), exported by a collector.
        self.fast_requests: dict[str, int] = {"/book/{symbol}": 0, "/book/{symbol}/l3": 0}
        r.register(_FastRequests(self.fast_requests))
        self.proxied = Counter("kumex_book_proxied_requests",
                               "Requests forwarded to the owning replica", ["symbol", "outcome"],
                               registry=r)
        self.ws_clients = Gauge("kumex_book_ws_clients", "Connected WebSocket clients", sym,
                                registry=r)
        self.ws_dropped = Counter("kumex_book_ws_dropped",
                                  "WebSocket clients dropped for being too slow", sym,
                                  registry=r)
        self.ws_refused = Counter("kumex_book_ws_refused", "WebSocket clients refused: the "
                                  "replica had BOOK_WS_MAX_CLIENTS already", registry=r)

    def sync_stats_adder(self, symbol: str) -> Callable[[SyncStats, SyncStats], None]:
        """``add(now, before)``: add to ``symbol``'s counters what a synchroniser counted
        since ``before`` (both its :class:`SyncStats`); the labelled counters are looked
        up once, here, not at each batch."""
        children = [(counter.labels(symbol), field) for counter, field in (
            (self.messages, "messages"),
            (self.applied, "applied"),
            (self.ignored, "stale"),
            (self.dropped, "dropped"),
            (self.refused, "refused"),
            (self.overflow, "overflow"),
            (self.gaps, "gaps"),
            (self.resyncs, "resyncs"),
            (self.feed_disconnects, "disconnects"),
            (self.feed_silences, "silences"),
            (self.snapshots_used, "snapshots_used"),
        )]

        def add(now: SyncStats, before: SyncStats) -> None:
            for child, field in children:
                delta = getattr(now, field) - getattr(before, field)
                if delta > 0:
                    child.inc(delta)

        return add


class _FastRequests(Collector):
    """``kumex_book_http_fast_requests_total{route}`` from :attr:`BookMetrics.fast_requests`."""

    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "kumex_book_http_fast_requests",
            "Requests answered by the fast route (a body already built, written from the "
            "HTTP parser; not in the latency histogram)", labels=["route"])
        for route, n in self._counts.items():
            family.add_metric([route], n)
        yield family
