"""The book's stream reader: how a blocking read and its follow-up combine (pure part)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.book.reader import _by_stream


def _entries(stream: str, first: int, n: int) -> list[list[Any]]:
    """Raw entries as hiredis gives them: [id, [field, value, ...]]."""
    return [[f"{first + i}-0".encode(), [b"msg", f"{stream}:{first + i}".encode()]]
            for i in range(n)]


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]),
                       st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=3),
       st.booleans())
def test_the_follow_up_adds_what_came_after_the_blocking_reply(
        reads: dict[str, tuple[int, int]], resp3: bool) -> None:
    """Each stream read from the same position twice, ``a`` then ``b`` entries: together
    they give the longer run, each entry once and in order."""
    first = {s.encode(): _entries(s, 1, a) for s, (a, _) in reads.items() if a}
    second = {s.encode(): _entries(s, 1, max(a, b)) for s, (a, b) in reads.items()
              if max(a, b)}

    def raw(reply: dict[bytes, Any]) -> Any:
        return reply if resp3 else [[k, v] for k, v in reply.items()] or None

    got = _by_stream(raw(first), raw(second))
    assert got == {s: [(f"{i}-0".encode(), {b"msg": f"{s}:{i}".encode()})
                       for i in range(1, max(a, b) + 1)]
                   for s, (a, b) in reads.items() if max(a, b)}


def test_a_follow_up_that_does_not_start_where_the_blocking_reply_did_is_not_used() -> None:
    """The stream trimmed between the two reads: the blocking reply alone, so that the next
    read goes on after it and nothing is skipped."""
    first = [[b"a", _entries("a", 5, 2)]]
    second = [[b"a", _entries("a", 6, 4)]]
    assert [e[0] for e in _by_stream(first, second)["a"]] == [b"5-0", b"6-0"]
    assert _by_stream(None, None) == {}
    assert list(_by_stream(None, second)["a"][0][1]) == [b"msg"]
