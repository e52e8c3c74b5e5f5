"""`StandIn`: what takes a client's place on a server connection while halephant runs its own query there
(a reset before the server goes back to its pool, the shared LISTEN connection, the read-your-writes LSN
query).

A server calls its linked client back (`server_ready`, `server_lost`, `parameter_changed`, ...) and reads a
few of its attributes on every chunk. A stand-in answers the callbacks it has no use for by doing nothing,
is not a transaction-mode client and names no prepared statement; subclasses implement `server_ready` and
give a `transport` to write the server's bytes to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from halephant.proxy.server import ServerConnection


class StandIn:
    __slots__ = ()

    transaction_mode = False
    statement_mode = False
    prepared = None  # never names a prepared statement (halephant.proxy.prepared)
    session = None  # carries no session state (an ErrorResponse, say of a failed reset, checks it)
    held_back = False  # holds nothing back for a next transaction (ClientConnection.resume_held)
    held_output = None  # its output is never held to the end of the loop iteration: `hold` writes it

    transport: Any  # where the server's bytes go (a subclass's sink)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    hold = send

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        pass

    def resume_reading_from_server(self) -> None:
        pass

    def pin_for(self, reason: str) -> None:
        pass

    def settings_applied(self, error: object) -> None:
        pass

    def copy_in_started(self, counted: int = 0) -> None:
        pass

    def parameter_changed(self, name: str) -> None:
        pass
