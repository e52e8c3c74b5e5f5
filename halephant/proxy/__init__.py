"""The I/O layer: listeners, client and server connections, cancellation, timers.

anyio gives the structure (task group, signals, timeouts on connection set-up); the per-message path is
asyncio Protocol callbacks with no task hop per message (see the design notes, "hot path")."""
