"""Output to clients, held to the end of the event loop's iteration and then written: write coalescing.

An answer that ends a client's transaction is not written the moment halephant has it.
`ClientConnection.hold` keeps it on the client (`held_output`) and puts the client on `held`; `flush`
writes everything held
once the loop has run the callbacks of every connection that was ready in this iteration. The first
client held in an iteration schedules it (`call_soon`), so the delay is the rest of that iteration.

Why: a client that serves many connections from one thread (pgbench, an asyncio application's pool)
sleeps in `poll` until one of them is readable. Written one by one, each answer may wake it for itself
alone; written together, the answers of one iteration are found together. Behind halephant, pgbench
`-S` at c=100 made 0.34 `ppoll` calls per transaction before this and 0.19 with it (behind PgBouncer:
0.17 to 0.23), and the CPU it no longer spent went to PostgreSQL and halephant (bench/README.md).

Only an answer that ends the client's transaction waits, and only where there is something to write it
with (`ServerConnection._to_client`, inlined on the hot path); everything else is written at once:
  * an answer while nothing is held yet in this iteration and no other server of its pool is busy: a
    lone client would only wait for what `server_ready` does next (pgbench at c=1 lost about 10 % when
    its answers were held too);
  * an answer inside a transaction: the locks the transaction holds would be held longer;
  * part of an answer (no ReadyForQuery in the chunk): a large result gains nothing from waiting;
  * the answers to SSLRequest and GSSENCRequest, ahead of a TLS handshake;
  * what the stand-ins that take a client's place on a server receive (`halephant.proxy.stand_in`).
What halephant answers itself (`ClientConnection.send`) is written at once too, behind what is held for
the client if anything is: held, the answers to a client that sends much and reads nothing would only
reach the transport at the end of the iteration, and its backpressure (`pause_writing`) with them.

Order is kept: once a client has output held, everything else for it is appended behind it, and
`ClientConnection.close` writes what is held before closing; the admin console writes what is held
before it takes the transport over.

One list for the process: halephant runs one event loop per process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from halephant.proxy.client import ClientConnection

__all__ = ["flush", "held"]

log = logging.getLogger(__name__)

#: clients with output waiting for `flush`, in the order they were first held in this iteration
held: list[ClientConnection] = []


def flush() -> None:
    """Write what is held for each client, in the order the clients were held (scheduled by the first
    `ClientConnection.hold` of the iteration)."""
    for client in held:  # (a list's iterator also reaches what is appended meanwhile)
        out = client.held_output
        if out is None:  # written by `close` already, or the connection was lost
            continue
        client.held_output = None
        try:
            client.transport.write(out)
        except Exception as exc:  # its transport is gone: connection_lost says so to the client
            log.debug("%r: output not written: %s", client, exc)
    held.clear()
