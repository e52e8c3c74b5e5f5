"""Sans-IO PostgreSQL frontend/backend protocol 3.0: bytes in, packets, frames and bytes out.

Nothing here touches a socket or imports anyio, the proxy or the pool, which is what lets the codec be
tested byte by byte and fuzzed without PostgreSQL. `codes` names the message types, `startup` handles the
untyped startup phase, `framing` finds message boundaries after login, `messages` encodes and decodes the
messages halephant originates or must read.
"""
