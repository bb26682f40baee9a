"""The book's HTTP stack answering a constant 2 KB body: the ceiling beside the book's figures.

``python -m bench.read_ceiling PORT`` serves, on 127.0.0.1:PORT, with the book
service's own server settings (uvicorn, :func:`kumex_l3.httpserver.http_protocol`,
the same event loop, no access log):

* ``GET /constant``: through the fast route, as ``GET /book`` is;
* ``GET /constant/app``: through a plain FastAPI route, as the book's other
  routes are (the framework's cost, for comparison).
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from kumex_l3.httpserver import FastAnswer, http_protocol
from kumex_l3.service import loop_name

BODY = b'{"pad":"' + b"x" * (2048 - 10) + b'"}'
_ANSWER = FastAnswer.of(200, BODY, ((b"content-type", b"application/json"),))


def fast(path: str, query: bytes) -> FastAnswer | None:
    return _ANSWER if path == "/constant" and not query else None


def main() -> None:
    app = FastAPI()

    @app.get("/constant/app")
    async def constant() -> Response:
        return Response(BODY, media_type="application/json")

    config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None,
                            access_log=False, lifespan="off", loop=loop_name("auto"),
                            http=http_protocol(fast=fast))
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
