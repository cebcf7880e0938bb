"""A deadline for request headers, on top of uvicorn's HTTP protocol (httptools).

uvicorn closes a kept-alive connection that sends nothing, and the app drops a body that stalls
(`Limits.idle_upload_timeout_s`), but a connection whose request headers stop half-way is kept
for ever (uvicorn has no header timeout), holding one of `--max-connections`: a few hundred such
connections would leave every client, /health included, with 503s.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def http_protocol_with_header_timeout(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not all in within
    `header_timeout_s`: counted from the connection for its first request, from the request's
    first byte for the next ones on a kept-alive connection. Bodies, evaluations and idle time
    between requests are not counted (the app's upload timeouts and uvicorn's keep-alive are)."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            self._header_timer = None
            super().connection_made(transport)
            self._start_header_clock()

        def _start_header_clock(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

        def _stop_header_clock(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        # httptools calls these as a request's first byte and its last header arrive.
        def on_message_begin(self) -> None:
            self._start_header_clock()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._stop_header_clock()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._stop_header_clock()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
