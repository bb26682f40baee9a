"""kumex_l3: a KuMEX Level 3 feed turned into a local order book and own-order state.

The pure core (no I/O): :func:`parse_message` and :func:`parse_snapshot` turn
raw exchange text into typed messages; :class:`OrderBook` keeps an
order-by-order book in strict sequence. Errors form one tree rooted at
:class:`KumexError` (see :mod:`kumex_l3.errors`).

The walls (checked by ``make lint``, tests/unit/test_import_rules.py):

* the pure core, plain Python with no I/O, importing only itself: ``access``,
  ``backoff``, ``book``, ``errors``, ``grid``, ``keys``, ``messages``, ``orders``,
  ``sequence``, ``signing``, ``sync``;
* the adapters wire it to Redis, HTTP and sockets: ``config``, ``lease``,
  ``logs``, ``metrics``, ``order_store``, ``rest``, ``service``, ``tasks``,
  ``trading``, ``wsclient``; the user's tools: ``replay``, ``viewer``;
* the development tools that tests, bench and chaos share: ``kumex_l3.testing``
  (throwaway Redis, synthetic streams, processes, the sandbox process);
* nothing here imports a service or a test, bench or chaos tool, nothing but the
  development tools imports them, and no service imports another.
"""

from kumex_l3.book import (
    BookStats,
    DepthLevel,
    L3Level,
    L3Order,
    OrderBook,
    QueuePosition,
    Trade,
)
from kumex_l3.errors import BookError, IntegrityError, KumexError, MessageError, SequenceGap
from kumex_l3.messages import (
    Control,
    DataMessage,
    Done,
    Match,
    Message,
    Open,
    Received,
    Snapshot,
    SnapshotOrder,
    Update,
    parse_message,
    parse_snapshot,
)

__all__ = [
    "BookError",
    "BookStats",
    "Control",
    "DataMessage",
    "DepthLevel",
    "Done",
    "IntegrityError",
    "KumexError",
    "L3Level",
    "L3Order",
    "Match",
    "Message",
    "MessageError",
    "Open",
    "OrderBook",
    "QueuePosition",
    "Received",
    "SequenceGap",
    "Snapshot",
    "SnapshotOrder",
    "Trade",
    "Update",
    "parse_message",
    "parse_snapshot",
]

__version__ = "0.1.0"
