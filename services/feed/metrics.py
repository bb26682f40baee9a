"""The feed's Prometheus metrics, all on one registry (``GET /metrics``).

=========================================================  ===============================
metric                                                     what
=========================================================  ===============================
``kumex_feed_messages_received_total{symbol}``             data frames read, all lines
``kumex_feed_messages_unrouted_total{reason}``             frames with no configured
                                                           symbol (``no_topic``,
                                                           ``unknown_topic``,
                                                           ``unknown_type``, ``invalid``):
                                                           logged and counted, not stored
``kumex_feed_messages_invalid_total{symbol}``              frames refused (not a valid
                                                           message, implausible sequence):
                                                           dead-lettered
``kumex_feed_messages_conflicts_total{symbol}``            copies of a written sequence that
                                                           are a different valid message
                                                           (refused: one of them is forged
                                                           or corrupt)
``kumex_feed_messages_written_total{symbol}``              data messages appended
``kumex_feed_messages_repeated_total{symbol}``             frames the stream head already
                                                           had (not written twice)
``kumex_feed_messages_fenced_total{symbol}``               entries not written: this feed
                                                           was not the symbol's writer
``kumex_feed_messages_dropped_total{symbol}``              lost to a full buffer (or
                                                           refused by Redis)
``kumex_feed_gaps_total{symbol}``                          ``ctl=gap`` entries written
``kumex_feed_connections_total``                           line connections subscribed
``kumex_feed_reconnects_total``                            line connections that ended
``kumex_feed_connected``                                   1 while a session is up (at
                                                           least one line subscribed)
``kumex_feed_line_connected{line}``                        1 while the line is subscribed
``kumex_feed_line_reconnects_total{line}``                 the line's connections that ended
``kumex_feed_line_messages_total{line}``                   data frames the line delivered
``kumex_feed_line_first_total{line}``                      messages written from this line
                                                           (it delivered them first)
``kumex_feed_line_missed_total{line}``                     sequences the line skipped
``kumex_feed_line_covered_total{line}``                    of those, sequences another line
                                                           had delivered: gaps filled by
                                                           the other line
``kumex_feed_line_filled_total{line}``                     holes of the merged stream the
                                                           line filled in time
``kumex_feed_arbitration_holes_closed_total{symbol}``      holes filled by a later copy
``kumex_feed_arbitration_gaps_total{symbol}``              real gaps: no line delivered
``kumex_feed_arbitration_lost_total{symbol}``              messages lost in real gaps
``kumex_feed_arbitration_duplicates_total{symbol}``        copies dropped
``kumex_feed_arbitration_refused_total{symbol}``           implausible sequences refused
``kumex_feed_arbitration_fill_seconds``                    how long a hole waited for the
                                                           copy that filled it (histogram:
                                                           what ``FEED_ARBITRATION_WAIT_MS``
                                                           must cover)
``kumex_feed_arbitration_fill_max_seconds``                the longest of those waits
``kumex_feed_writer{symbol}``                              1 while this feed writes it
``kumex_feed_takeovers_total{symbol}``                     times this feed became its writer
``kumex_feed_takeover_backlog_total{symbol}``              messages written from memory at
                                                           takeovers
``kumex_feed_snapshots_fetched_total{symbol}``             valid snapshots fetched and queued
``kumex_feed_snapshots_refused_total{symbol,reason}``      ``rate_limited``, ``invalid``,
                                                           ``http_error``, ``error_reply``
``kumex_feed_snapshot_requests_total{symbol}``             requests read from the channel
``kumex_feed_snapshot_scheduler``                          1 while this feed schedules
``kumex_feed_snapshot_queue``                              symbols waiting for a snapshot
``kumex_feed_snapshot_waiting_seconds{symbol}``            how long its request has waited
``kumex_feed_snapshot_due_seconds{symbol}``                until its snapshot is expected
``kumex_feed_buffer_depth``                                entries waiting for Redis
``kumex_feed_redis_errors_total{op}``                      ``write``, ``pubsub``,
                                                           ``heartbeat``, ``publish``, ``due``
``kumex_feed_capture_errors_total``                        failed writes to ``FEED_CAPTURE``
=========================================================  ===============================

The line and arbitration figures are read from the arbiters' own counters at
each scrape (:class:`LineCollector`): nothing is incremented per message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kumex_l3.metrics import make_registry
from services.feed.arbiter import FILL_BUCKETS

if TYPE_CHECKING:
    from services.feed.arbiter import Arbiter
    from services.feed.lines import Line

__all__ = ["FeedMetrics", "LineCollector"]


class FeedMetrics:
    """Every metric of the feed, on ``registry`` (a fresh one when ``None``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else make_registry()
        reg = self.registry
        self.received = Counter("kumex_feed_messages_received", "Data frames read from the "
                                "exchange, all lines", ["symbol"], registry=reg)
        self.unrouted = Counter("kumex_feed_messages_unrouted", "Frames with no configured "
                                "symbol (counted and logged, not stored)", ["reason"],
                                registry=reg)
        self.invalid = Counter("kumex_feed_messages_invalid", "Frames refused to the DLQ "
                               "(not a valid message, implausible sequence)", ["symbol"],
                               registry=reg)
        self.conflicts = Counter("kumex_feed_messages_conflicts", "Copies of a written "
                                 "sequence that are a different valid message (refused)",
                                 ["symbol"], registry=reg)
        self.written = Counter("kumex_feed_messages_written", "Data messages appended to the "
                               "symbol's stream", ["symbol"], registry=reg)
        self.repeated = Counter("kumex_feed_messages_repeated", "Frames not written: the "
                                "stream head already had their sequence", ["symbol"],
                                registry=reg)
        self.fenced = Counter("kumex_feed_messages_fenced", "Entries not written: this feed "
                              "was not the symbol's writer", ["symbol"], registry=reg)
        self.dropped = Counter("kumex_feed_messages_dropped", "Messages lost to a full buffer "
                               "or refused by Redis", ["symbol"], registry=reg)
        self.gaps = Counter("kumex_feed_gaps", "ctl=gap entries written", ["symbol"],
                            registry=reg)
        self.connections = Counter("kumex_feed_connections", "Line connections welcomed and "
                                   "subscribed", registry=reg)
        self.reconnects = Counter("kumex_feed_reconnects", "Line connections that ended",
                                  registry=reg)
        self.connected = Gauge("kumex_feed_connected", "1 while a session is up (at least "
                               "one line subscribed)", registry=reg)
        self.writer = Gauge("kumex_feed_writer", "1 while this feed writes the symbol's "
                            "stream", ["symbol"], registry=reg)
        self.takeovers = Counter("kumex_feed_takeovers", "Times this feed became the symbol's "
                                 "writer", ["symbol"], registry=reg)
        self.backlog = Counter("kumex_feed_takeover_backlog", "Messages written from memory "
                               "at takeovers", ["symbol"], registry=reg)
        self.snapshots_fetched = Counter("kumex_feed_snapshots_fetched", "Valid L3 snapshots "
                                         "fetched", ["symbol"], registry=reg)
        self.snapshots_refused = Counter("kumex_feed_snapshots_refused", "Snapshot fetches "
                                         "that failed", ["symbol", "reason"], registry=reg)
        self.snapshot_requests = Counter("kumex_feed_snapshot_requests", "Snapshot requests "
                                         "read from the pub/sub channel", ["symbol"],
                                         registry=reg)
        self.scheduler = Gauge("kumex_feed_snapshot_scheduler", "1 while this feed fetches "
                               "the snapshots of every symbol", registry=reg)
        self.snapshot_queue = Gauge("kumex_feed_snapshot_queue", "Symbols waiting for a "
                                    "snapshot", registry=reg)
        self.snapshot_waiting = Gauge("kumex_feed_snapshot_waiting_seconds", "How long the "
                                      "symbol's snapshot request has waited", ["symbol"],
                                      registry=reg)
        self.snapshot_due = Gauge("kumex_feed_snapshot_due_seconds", "Seconds until the "
                                  "symbol's snapshot is expected to be fetched", ["symbol"],
                                  registry=reg)
        self.buffer_depth = Gauge("kumex_feed_buffer_depth", "Entries waiting for Redis",
                                  registry=reg)
        self.redis_errors = Counter("kumex_feed_redis_errors", "Redis errors", ["op"],
                                    registry=reg)
        self.capture_errors = Counter("kumex_feed_capture_errors", "Failed writes to the "
                                      "capture file", registry=reg)


class LineCollector(Collector):
    """Per-line and per-symbol arbitration figures, read from the arbiters at each scrape."""

    def __init__(self, lines: Sequence[Line],
                 arbiters: Callable[[], Iterable[tuple[str, Arbiter, bool]]]) -> None:
        self._lines = lines
        self._arbiters = arbiters

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        lines = self._lines
        connected = GaugeMetricFamily("kumex_feed_line_connected", "1 while the line is "
                                      "subscribed", labels=["line"])
        reconnects = CounterMetricFamily("kumex_feed_line_reconnects", "The line's "
                                         "connections that ended", labels=["line"])
        for line in lines:
            connected.add_metric([str(line.index)], 1.0 if line.subscribed else 0.0)
            reconnects.add_metric([str(line.index)], line.reconnects)
        yield connected
        yield reconnects
        per_line = {name: CounterMetricFamily(f"kumex_feed_line_{name}", text, labels=["line"])
                    for name, text in (
                        ("messages", "Data frames the line delivered"),
                        ("first", "Messages written from this line (delivered first)"),
                        ("missed", "Sequences the line skipped"),
                        ("covered", "Sequences the line skipped that another line had "
                                    "delivered (gaps filled by the other line)"),
                        ("filled", "Holes of the merged stream the line filled in time"))}
        totals = {name: [0] * len(lines) for name in per_line}
        per_symbol = {name: CounterMetricFamily(f"kumex_feed_arbitration_{name}", text,
                                                labels=["symbol"])
                      for name, text in (
                          ("holes_closed", "Holes of the merged stream filled by a later copy"),
                          ("gaps", "Real gaps: no line delivered the messages"),
                          ("lost", "Messages lost in real gaps"),
                          ("duplicates", "Copies dropped"),
                          ("refused", "Implausible sequences refused"))}
        buckets = [0] * (len(FILL_BUCKETS) + 1)
        fill_sum = fill_max = 0.0
        for symbol, arbiter, _ in self._arbiters():
            stats = arbiter.stats
            for name in totals:
                counts: list[int] = getattr(stats, name)
                for i, value in enumerate(counts):
                    if i < len(lines):
                        totals[name][i] += value
            per_symbol["holes_closed"].add_metric([symbol], stats.holes_closed)
            per_symbol["gaps"].add_metric([symbol], stats.real_gaps)
            per_symbol["lost"].add_metric([symbol], stats.lost)
            per_symbol["duplicates"].add_metric([symbol], stats.duplicates)
            per_symbol["refused"].add_metric([symbol], stats.refused)
            for i, count in enumerate(stats.fill_buckets):
                buckets[i] += count
            fill_sum += stats.fill_seconds
            fill_max = max(fill_max, stats.fill_max)
        for name, family in per_line.items():
            for i, value in enumerate(totals[name]):
                family.add_metric([str(i)], value)
            yield family
        yield from per_symbol.values()
        cumulative, running = [], 0
        for bound, count in zip((*map(str, FILL_BUCKETS), "+Inf"), buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily("kumex_feed_arbitration_fill_seconds", "How long a hole "
                                    "waited for the copy that filled it",
                                    buckets=cumulative, sum_value=fill_sum)
        yield GaugeMetricFamily("kumex_feed_arbitration_fill_max_seconds", "The longest a "
                                "hole waited for the copy that filled it",
                                value=fill_max)
