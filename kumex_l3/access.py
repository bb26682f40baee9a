"""Who may read what a service knows of the user's own orders (pure, no I/O).

The book's WebSocket ``own`` list (orderId, side, price, queue position) and
the strategy's ``/state`` say where the user's orders are: nothing another
account should learn. They are served only with a token
(``BOOK_API_TOKEN`` / ``STRATEGY_API_TOKEN``), given as ``Authorization:
Bearer <token>`` or, where a browser cannot set headers (WebSocket), as the
query parameter ``token``. Without a token configured they are served only
when the service listens on the loopback interface alone (this machine's
users); a service listening wider without one does not serve them at all, and
says so.

::

    guard = Guard(settings.api_token, settings.host)
    if guard.allows(presented_token(headers, query)):
        ...
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Final, Literal

from pydantic import SecretStr

__all__ = ["LOOPBACK_HOSTS", "Guard", "Policy", "is_loopback", "presented_token"]

#: Addresses that only this machine can reach.
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})

#: ``token``: a token is required; ``open``: loopback only, no token configured;
#: ``off``: listening wider without a token: never served.
Policy = Literal["token", "open", "off"]


def is_loopback(host: str) -> bool:
    """Whether a service bound to ``host`` is reachable from this machine only."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token a request presents: ``Authorization: Bearer ...``, else ``?token=``."""
    auth = headers.get("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = query.get("token")
    return token or None


class Guard:
    """The access rule of one service (see the module docstring)."""

    def __init__(self, token: SecretStr | None, host: str) -> None:
        secret = token.get_secret_value() if token is not None else ""
        self._token = secret.encode() if secret else None
        self.policy: Policy = ("token" if self._token is not None
                               else "open" if is_loopback(host) else "off")

    def allows(self, presented: str | None) -> bool:
        """Whether a request presenting ``presented`` (or nothing) may read own orders."""
        if self.policy == "open":
            return True
        if self._token is None or presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self._token)

    def refusal(self, what: str, variable: str) -> str:
        """Why a request was refused, for its error body."""
        if self.policy == "off":
            return (f"{what} is not served: this service listens beyond the loopback "
                    f"interface and {variable} is not set")
        return f"{what} needs the token of {variable} (Authorization: Bearer, or ?token=)"
