"""HEAD answered as GET without a body (RFC 9110 9.3.2: a server MUST support GET and HEAD).

FastAPI's routes declared with `@router.get` match GET only, so a HEAD got 405: load-balancer
and uptime checks that use HEAD (Azure Front Door's default probe, HAProxy's `httpchk HEAD`,
`curl -I`) saw every pod as down. Adding HEAD to each route would also add it to the OpenAPI
document, and to what clients generated from it must handle; instead the application sees a
GET. uvicorn decides whether to send a body from its own copy of the scope, which still says
HEAD: the status and headers (Content-Length included) are the GET's, the body is dropped.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # a copy: uvicorn's own scope stays HEAD
        await self.app(scope, receive, send)
