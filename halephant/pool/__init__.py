"""Server-connection pools: who gets which server, who waits, what to open and close.

Decisions here are synchronous and do no I/O; the proxy performs the I/O they call for, so a cancelled
task can never leave a pool half-changed."""
