"""Errors that aiohttp answers by itself, before any route or middleware runs, as ours.

A request aiohttp's parser refuses (a NUL byte in a header, a line too long, TLS bytes on the
HTTP port) is answered by ``RequestHandler.handle_error``, whose plain-text body quotes the
offending bytes: an ``Authorization`` header, token and all, would come back in the answer and
go into the log with a traceback. Both servers (the control plane and ``streamv2v serve``) run
on :class:`JsonErrorRunner`, whose connections answer such requests the way every route does:
a JSON ``{"error": reason}`` that repeats nothing of the request, and one DEBUG line that names
the kind of error only.

aiohttp (3.9 to 3.14) makes one ``RequestHandler`` per connection in ``web.Server.__call__``;
``handle_error`` is the documented place where its error answers are built.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

#: What the client is told, by status; nothing of the request is ever echoed.
_REASONS = {
    400: "malformed HTTP request: the server's HTTP parser refused it",
    413: "request too large",
    431: "request header fields too large",
    500: "internal error (logged on the server)",
    504: "the request timed out",
}


def error_body(status: int) -> bytes:
    """The JSON body of an error aiohttp answers by itself."""
    reason = _REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase.lower()
        except ValueError:
            reason = "error"
    return (json.dumps({"error": reason}) + "\n").encode()


class _JsonErrorProtocol(RequestHandler):
    """One connection; only its error answers differ from aiohttp's."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a bug on our side: the traceback is worth having
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:  # the client's fault: one line, the kind only (the message quotes its bytes)
            kind = type(exc).__name__ if exc is not None else "error"
            self.logger.debug("refused a malformed request from %s (%s)", request.remote, kind)
        if request.writer.output_size > 0:  # (as aiohttp does) the answer has begun already
            raise ConnectionError("response already started; cannot send the error instead")
        response = web.Response(
            status=status, body=error_body(status), content_type="application/json"
        )
        # The headers every answer of ours carries (guard.add_security_headers).
        response.headers.update(
            {
                "Server": "streamv2v",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            }
        )
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        # As web.Server.__call__, with our connection class.
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """A ``web.AppRunner`` whose connections answer parser errors with our JSON body."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The application's own Server (its handler, request factory and settings), with
        # only the connection class changed; _JsonErrorServer adds no state of its own.
        server.__class__ = _JsonErrorServer
        return server
