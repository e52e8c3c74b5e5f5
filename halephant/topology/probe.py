"""Probing one PostgreSQL node: is it in recovery, where is its WAL, which timeline, how old is its replay.

`ProbeSession` is the sans-IO part (bytes in, bytes to send out): the login (through
`halephant.auth.upstream`) and one probe query at a time. `ProbeConnection` drives it over an anyio stream
(TCP, or the node's Unix-domain socket when it is given as a socket directory) and keeps that connection
open between probes, so a probe is one round trip. A TCP probe connection gets `limits.tcp_*` as server
connections do (`halephant.tcp`): kept open between probes, it would otherwise not notice a node whose
network path died until its next probe timed out, and a probe's send could hang on it. Any failure closes
the connection; the next probe connects again. It is also opened anew after `PROBES_PER_CONNECTION`
probes: a node shutting down in smart mode (a SIGTERM to the postmaster) lets the sessions it has go on
and refuses new ones (57P03), so only a new login tells that it is going away, and a connection kept
for ever would hold up its shutdown for as long as halephant runs. A TCP probe connection uses its
cluster's `tls:` settings as server connections do (`halephant.server_tls`): a node whose pg_hba.conf
takes only TLS logins (`hostssl`) is probed over TLS, and one whose certificate does not verify is
down for the probes, with the reason; over TLS the login is bound to the node's certificate
(SCRAM-SHA-256-PLUS) as a server connection's is; with `prefer`, a login refused over TLS is tried
again in plaintext, as a server connection's is (`halephant.node_streams.log_in`).
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.to_thread

from halephant.auth.own_session import OwnSession
from halephant.auth.upstream import passthrough_unready
from halephant.config import LimitsConfig
from halephant.errors import ClientError
from halephant.node_streams import close, log_in, until_ready
from halephant.protocol import messages as m
from halephant.server_tls import ServerTls, stream_certificate
from halephant.tcp import set_tcp_options

__all__ = [
    "PROBES_PER_CONNECTION",
    "PROBE_SQL",
    "ProbeConnection",
    "ProbeFailed",
    "ProbeResult",
    "ProbeSession",
    "parse_lsn",
]

#: probes made over one connection before it is closed and a new one logs in (a minute at the default
#: topology.interval of 5 s)
PROBES_PER_CONNECTION = 12

#: application_name of the probe connections, so operators can tell them apart in pg_stat_activity.
APPLICATION_NAME = "halephant topology"

# One statement for primaries and replicas alike, using functions any role may call. LSNs come as byte
# offsets (pg_lsn - '0/0' is numeric). A primary's timeline is the one it writes WAL on now (right after
# a promotion the checkpoint's may still be the old one); a replica's is its last restartpoint's.
# The replay age counts only while WAL is waiting to be replayed: a replica that is idle because its
# primary is idle is not behind.
PROBE_SQL = """\
SELECT r,
       CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END - '0/0',
       CASE WHEN NOT r THEN NULL
            WHEN coalesce(pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn(), true)
            THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())
            ELSE 0 END,
       CASE WHEN r THEN (SELECT timeline_id FROM pg_control_checkpoint())
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END
FROM pg_is_in_recovery() AS r"""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe of a node found."""

    in_recovery: bool
    #: a primary's current WAL position, a replica's replayed one (bytes); None if a replica replayed none
    lsn: int | None
    #: seconds since the last replayed commit while WAL waits to be replayed (0 when caught up)
    replay_age: float | None
    timeline: int | None


class ProbeFailed(Exception):
    """A probe could not tell anything about the node; the message says why, for the log."""


def parse_lsn(text: str) -> int:
    """`'0/3420660'` -> its byte offset (the form pg_current_wal_lsn() prints)."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def _number(value: str | None) -> float | None:
    return None if value is None else float(value)


class ProbeSession(OwnSession):
    """The probe's side of the protocol, sans-IO: `startup()`, then `query()`; `feed()` what arrives."""

    __slots__ = ()
    application_name = APPLICATION_NAME

    def failed(self, message: str, login: bool) -> Exception:
        return ProbeFailed(message)

    def query(self) -> bytes:
        self.begin()
        return m.query(PROBE_SQL)

    def result(self) -> ProbeResult:
        """The answer to the last `query()`, once its ReadyForQuery arrived."""
        if self.error is not None:
            raise ProbeFailed(f"probe query failed: {self.error}")
        row = self.rows[-1] if self.rows else None
        if row is None or len(row) != 4 or row[0] is None:
            raise ProbeFailed("probe query returned no row")
        try:
            lsn, age, timeline = _number(row[1]), _number(row[2]), _number(row[3])
        except ValueError:
            raise ProbeFailed("probe query returned something that is not a number") from None
        return ProbeResult(
            in_recovery=row[0] == "t",
            lsn=None if lsn is None else int(lsn),
            replay_age=age,
            timeline=None if timeline is None else int(timeline),
        )


class ProbeConnection:
    """A node's probe connection, opened on first use and kept open between probes."""

    __slots__ = (
        "_probes",
        "_session",
        "_stream",
        "database",
        "host",
        "limits",
        "password",
        "port",
        "tls",
        "user",
    )

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str | None,
        database: str,
        limits: LimitsConfig | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.database = database
        #: keepalive and user timeout for its TCP connections (None: the kernel's defaults); a reload
        #: sets the new ones, for connections opened from then on
        self.limits = limits
        #: the cluster's TLS settings (None: plaintext); a reload sets the new ones, for connections
        #: opened from then on
        self.tls = tls
        self._stream: anyio.abc.ByteStream | None = None
        self._session: ProbeSession | None = None
        self._probes = 0  # made over the current connection

    async def probe(self) -> ProbeResult:
        """Probe the node. Raises ProbeFailed, OSError or anyio's stream errors; the caller bounds the
        time. Whatever goes wrong (cancellation included), the connection is dropped.

        A kept connection that turns out to be closed (the node restarted, an administrator or
        `idle_session_timeout` ended the session) is not the node failing: the probe is tried once more
        on a new connection. One that has served `PROBES_PER_CONNECTION` probes is closed first: the new
        login is what finds a node that accepts no new sessions."""
        if self._stream is not None and self._probes >= PROBES_PER_CONNECTION:
            await self.aclose()
        reused = self._stream is not None
        try:
            return await self._probe()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await self.aclose()
            if not reused:
                raise
        except BaseException:
            await self.aclose()
            raise
        try:
            return await self._probe()
        except BaseException:
            await self.aclose()
            raise

    async def _probe(self) -> ProbeResult:
        if self._stream is None or self._session is None:
            await self._connect()
        assert self._stream is not None and self._session is not None
        self._probes += 1
        await self._stream.send(self._session.query())
        await self._until_ready()
        return self._session.result()

    async def _connect(self) -> None:
        unready = passthrough_unready(self.user, self.password)
        if unready is not None:
            # no connection at all until a client's login gives the keys: a probe each round would be
            # a login each round that PostgreSQL cannot but see fail
            raise ProbeFailed(unready.message)
        try:
            self._stream, self._session = await log_in(
                self.host, self.port, self.tls, self._new_session, "probe"
            )
        except ClientError as exc:  # TLS refused (its message says which setting), or not PostgreSQL
            raise ProbeFailed(exc.message) from None

    def _new_session(self, stream: anyio.abc.ByteStream) -> ProbeSession:
        if self.limits is not None:
            set_tcp_options(stream.extra(anyio.abc.SocketAttribute.raw_socket), self.limits)
        return ProbeSession(self.user, self.password, self.database, stream_certificate(stream))

    async def _until_ready(self) -> None:
        assert self._stream is not None and self._session is not None
        await until_ready(self._stream, self._session)

    async def aclose(self) -> None:
        stream, session, self._stream, self._session = self._stream, self._session, None, None
        self._probes = 0
        if stream is not None:
            await close(stream, session)
