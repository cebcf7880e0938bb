"""A deadline for request headers, on top of uvicorn's HTTP protocol.

uvicorn closes a kept-alive connection that sends nothing, and the app drops a body that stalls
(`Limits.idle_upload_timeout_s`), but a connection whose request headers stop half-way is kept
for ever (uvicorn has no header timeout), holding one of `--max-connections`: a few hundred such
connections would leave every client, /health included, with 503s.
"""

from __future__ import annotations

import asyncio


def _base_protocol() -> type:
    try:  # what uvicorn's "auto" picks when httptools is installed
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def http_protocol_with_header_timeout(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not all in within
    `header_timeout_s` of its first byte (or of the connection, for the first request)."""
    base = _base_protocol()

    class HeaderDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm_header_timer()

        def _waiting_for_headers(self) -> bool:
            # uvicorn makes a request cycle when a request's headers are complete.
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_headers():  # the start of a next request on a kept-alive connection
                self._arm_header_timer()
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
