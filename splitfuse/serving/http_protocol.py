"""uvicorn's h11 protocol with a deadline for the request head, which uvicorn lacks: a client that
sends its headers a byte at a time (slowloris) is disconnected instead of holding the connection."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """Closes the connection when no new request head has arrived HEADER_TIMEOUT_S after the
    connection opened or the previous reply ended (an idle keep-alive closes sooner, at 5 s)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        awaited = self.cycle  # the cycle that had ended (or None): a new head replaces it
        self.loop.call_later(self.header_timeout_s, self._head_overdue, awaited)

    def _head_overdue(self, awaited) -> None:
        if self.cycle is awaited and not self.transport.is_closing():
            self.transport.close()
