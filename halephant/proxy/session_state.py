"""A transaction-mode client's session state: settings, session-bound features, emulated LISTEN and PREPARE.

Connected directly, a client's `SET`s, `LISTEN`s and prepared statements live as long as its connection.
In transaction pooling the server changes at every transaction, so halephant carries them with the client:

* Settings: the startup parameters and every `SET`/`RESET`/`set_config` that survived its transaction are
  kept in `client.settings` and brought to whichever server the client gets next (only the difference, by
  `ServerConnection.apply_settings`). What survived is read from the server itself at the end of the
  transaction (`halephant.protocol.session_queries.boundary_sql`), so `SET LOCAL`, rolled-back `SET`s,
  savepoints and failed statements need no guessing. The server's own `settings` record follows, so the
  next client's difference undoes exactly what this one left.
* RESET: connected directly, `RESET x`, `RESET ALL`, `DISCARD ALL` and `SET x TO DEFAULT` take a setting
  back to the value the session got at startup. halephant sets the startup parameters as session values,
  which those take back to the server's defaults: a setting the client gave at startup that is read back
  at the server's own value gets its startup value again (`SessionState.startup`), set on the server
  before the client's next statement (`_restore_startup`), and the client is told the reported ones
  (ParameterStatus) as PostgreSQL tells them. Known limit: PostgreSQL has no way to change a session's
  reset value, so the statements that follow the RESET in the same transaction (or in the same
  multi-statement Query) see the pool's default for it; the startup value is back once that transaction
  has ended (committed: a rolled-back RESET changes nothing), and the ParameterStatus telling the client
  so comes right after that transaction's ReadyForQuery, where PostgreSQL sends it before.
* Session-bound features (`halephant.sql.effects.FEATURES`): the `halephant_inspect_query` verdict
  decides (`Pin` with a `feature`, `Reject`, or nothing = emulate where halephant can). A feature that is
  neither rejected nor emulated pins the client to its server (logged with its reason) until a statement
  that may release it ran and the server, checked at the end of that transaction, holds none of it.
* SQL `PREPARE` (emulated): statements prepared with SQL are read at the end of the transaction, removed
  from the server before it goes back, and prepared again on the client's next server.
* The search_path a transaction sets (also `SET LOCAL`, `set_config(..., true)`): the statements a client
  prepares from then on until the transaction ends are shared only with clients of that search_path
  (`prepare_context`), as the server parses them under it.
* `LISTEN` (emulated): the channels are read at the end of the transaction and handed to the database's
  shared listener connection (`halephant.proxy.listener`), which delivers each NOTIFY to every client
  listening on its channel; the server is then `UNLISTEN`ed. Notifications wait in a bounded queue while
  the client is in a transaction or not reading; a client that lets it overflow is told so and closed.

Nothing here runs for a client that never did any of this: the client checks `client.session is None`
once per transaction.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from halephant import sqlstate
from halephant.errors import ClientError
from halephant.protocol import codes
from halephant.protocol.encodings import codec_of, notification_for
from halephant.protocol.prepared import parse_context
from halephant.protocol.session_params import settings_sql
from halephant.protocol.session_queries import (
    KIND_FEATURE,
    KIND_LISTEN,
    KIND_PREPARED,
    KIND_SETTING,
    boundary_sql,
    cleanup_sql,
    prepare_sql,
    reset_sql,
    text_value,
)
from halephant.sql import Statement, setting_changes
from halephant.sql.effects import ALL, LISTEN, PREPARE, SETTINGS, session_effects
from halephant.types import Pin, Unpin, Verdict

if TYPE_CHECKING:
    from halephant.proxy.client import ClientConnection
    from halephant.proxy.server import ServerConnection

log = logging.getLogger("halephant.client")

#: a Pin without a feature (or for one halephant cannot check): held until an Unpin or the client leaves
SESSION_PIN: Final = "session"
#: ParameterStatus names that follow a held feature (SET ROLE / SESSION AUTHORIZATION), not a setting
_NOT_SETTINGS: Final = frozenset(("session_authorization", "is_superuser", "in_hot_standby"))
#: notifications a client may have waiting before it is disconnected
MAX_QUEUED_NOTIFICATIONS: Final = 10_000
MAX_QUEUED_NOTIFICATION_BYTES: Final = 4 * 1024 * 1024
#: how many, and how long, notifications delivered by a server are remembered against duplicates
RELAYED_KEPT: Final = 256
RELAYED_SECONDS: Final = 5.0
#: what a server about to stop listening NOTIFYs itself with, to read the notification queue
HANDOVER_CHANNEL: Final = "halephant_listen_handover"
_CHECKABLE: Final = frozenset(
    ("advisory_locks", "listen", "with_hold", "temp_tables", "prepare", "set_role", "load")
)
#: `_search_path_set` for a search_path that cannot be read from the text (a parameter, an expression)
_UNKNOWN_PATH: Final = "\x01"
#: ...each of which stands for a search_path of its own
_unknown_paths = itertools.count(1)


class SessionState:
    """What one transaction-mode client carries beyond its startup settings (created on first need)."""

    __slots__ = (
        "broken",
        "capture",
        "capture_all",
        "check",
        "cleaning",
        "handed_over",
        "handover_until",
        "listen_seen",
        "listening",
        "owns_pin",
        "parsed",
        "pin_reason",
        "pins",
        "prepare_seen",
        "prepared",
        "queue",
        "queued_bytes",
        "reading_on",
        "relayed",
        "search_path",
        "server_channels",
        "settings_owned",
        "startup",
        "unlisten_undone",
        "unlistening",
    )

    def __init__(self) -> None:
        #: setting names to read back at the end of the transaction
        self.capture: set[str] = set()
        self.capture_all = False
        #: held features -> why (each is a pin); SESSION_PIN for a plugin's feature-less Pin
        self.pins: dict[str, str] = {}
        #: the client's pin is ours (released when `pins` empties), not the core's for another reason
        self.owns_pin = False
        #: the reason the client's pin was logged with (what `server.dirty` says while it lasts)
        self.pin_reason = ""
        #: a statement may have released a held feature: check the server at the end of the transaction
        self.check = False
        #: the linked server may hold emulated LISTEN / SQL PREPARE state of this client
        self.listen_seen = False
        self.prepare_seen = False
        #: waiting for the shared listener before the server's own LISTENs can be undone
        self.cleaning = False
        #: the server the session state is being read back from, after a transaction
        self.reading_on: ServerConnection | None = None
        #: emulated state: channels listened to, SQL prepared statements (name -> PREPARE text)
        self.listening: set[str] = set()
        self.prepared: dict[str, str] = {}
        #: channels the linked server itself listens to for this client (last read back)
        self.server_channels: set[str] = set()
        #: emulated channels UNLISTENed in the current transaction: stopped at its end if it commits
        self.unlistening: set[str] | None = None
        #: ...and the transaction will not commit (an error, a ROLLBACK): they stay
        self.unlisten_undone = False
        #: the session state could not be read back: the server is closed when the client leaves
        self.broken = ""
        #: `client.settings` is this client's own dict (the startup one may be shared)
        self.settings_owned = False
        #: the settings the client logged in with (the startup dict itself, never changed), from the
        #: first read-back on: what `RESET` brings a setting back to
        self.startup: dict[str, str] = {}
        #: statements parsed by name (b"" = unnamed) that touch the session, with the inspect verdict they
        #: got: applied each time a Bind runs them (`on_bind`), not when they are prepared
        self.parsed: dict[bytes, tuple[Statement, Verdict | None]] = {}
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        #: notifications the linked server delivered itself lately (time, payload): while the shared
        #: listener takes over a channel both may deliver the same one, and only one copy must arrive
        self.relayed: deque[tuple[float, bytes]] = deque(maxlen=RELAYED_KEPT)
        #: ...and the other way round: what the shared listener delivered since the last handover
        #: (time, payload), against the copies the server still sends while its LISTENs are undone
        self.handed_over: deque[tuple[float, bytes]] = deque(maxlen=RELAYED_KEPT)
        #: until when (monotonic) those are recorded: only a hand-over's window needs them
        self.handover_until = 0.0
        #: the search_path the current transaction set, as `(value,)` (None: back to the default), which
        #: statements prepared until it ends are parsed under; None when it set none
        self.search_path: tuple[str | None] | None = None


def _state(client: ClientConnection) -> SessionState:
    st = client.session
    if st is None:
        st = client.session = SessionState()
    return st


def _hold(client: ClientConnection, st: SessionState, feature: str, reason: str) -> None:
    st.pins[feature] = reason
    if not client.pinned:
        client.pin_for(reason)
        st.owns_pin = True
        st.pin_reason = reason
    else:
        log.info("%r: also holds %s: %s", client, feature, reason)


def on_parse(client: ClientConnection, name: bytes, statement: Statement, verdict: Verdict | None) -> None:
    """A Parse about to go to the linked server in transaction pooling, with the inspect verdict (Reject
    never comes here). Preparing a statement changes nothing in the session: what it does happens each time
    a Bind runs it, maybe transactions later (drivers prepare once, then send only Bind/Execute), so it is
    remembered here for `on_bind`."""
    if (
        session_effects(statement)
        or verdict is not None
        or (not statement.plain and statement.mentions("search_path"))  # SET LOCAL: `search_path_set`
    ):
        _state(client).parsed[name] = (statement, verdict)
    elif client.session is not None:
        client.session.parsed.pop(name, None)  # a name parsed again for an ordinary statement


def on_bind(client: ClientConnection, name: bytes) -> None:
    """A Bind of statement `name` about to go to the linked server in transaction pooling: when the statement
    touches the session, it is about to run, as a Query of its text would."""
    st = client.session
    if st is not None:
        noted = st.parsed.get(name)
        if noted is not None:
            on_statement(client, noted[0], noted[1])
            search_path_set(client, noted[0])


def on_close(client: ClientConnection, name: bytes) -> None:
    """The client closes its prepared statement `name`."""
    st = client.session
    if st is not None:
        st.parsed.pop(name, None)


def on_statement(client: ClientConnection, statement: Statement, verdict: Verdict | None) -> None:
    """A Query (or the Bind of a parsed statement, `on_bind`) about to go to the linked server in
    transaction pooling, with the inspect verdict (Reject never comes here)."""
    st = _state(client)
    pin = verdict if isinstance(verdict, Pin) else None
    pin_used = False
    due = False
    for effect in session_effects(statement):
        feature = effect.feature
        if feature == SETTINGS:
            if not effect.names:
                _hold(client, st, SESSION_PIN, "set_config() with a computed setting name")
            elif ALL in effect.names:
                st.capture_all = True
                due = True
            else:
                st.capture.update(effect.names)
                due = True
        elif effect.acquire:
            if pin is not None and pin.feature in ("", feature):
                _hold(client, st, feature if feature in _CHECKABLE else SESSION_PIN, pin.reason)
                pin_used = True
            elif feature == LISTEN:
                st.listen_seen = True
                due = True
                if effect.names:
                    client.app.listeners.prepare(client, effect.names)
            elif feature == PREPARE:
                st.prepare_seen = True
                due = True
            elif feature not in st.pins:
                # not emulated and no plugin decided: keep the server, as a direct connection would
                reason = f"{feature}: {statement.first_keyword} (no policy answered: pinned)"
                _hold(client, st, feature, reason)
        else:
            if feature in st.pins:
                st.check = True
                due = True
            if feature == LISTEN and st.listening:
                # as in PostgreSQL, the UNLISTEN takes effect when the transaction commits (`at_idle`)
                channels = st.listening.copy() if ALL in effect.names else set(effect.names) & st.listening
                st.unlistening = channels if st.unlistening is None else st.unlistening | channels
                due = True
            elif feature == PREPARE:
                if ALL in effect.names:
                    st.prepared.clear()
                else:
                    for name in effect.names:
                        st.prepared.pop(name, None)
    if pin is not None and not pin_used:
        feature = pin.feature if pin.feature in _CHECKABLE else SESSION_PIN
        _hold(client, st, feature, pin.reason)
    elif isinstance(verdict, Unpin) and SESSION_PIN in st.pins:
        del st.pins[SESSION_PIN]
        log.info("%r: unpin asked: %s", client, verdict.reason)
        st.check = True
        due = True
    if due:
        client.session_due = True


def search_path_set(client: ClientConnection, statement: Statement) -> None:
    """`statement` is about to run in transaction pooling and may set search_path (it is a SET, RESET,
    DISCARD or set_config, or mentions search_path): if it does, the statements the client prepares from
    here until the end of its transaction are those of clients of the new search_path.

    A named statement is shared by the clients whose settings parse it alike (`parse_context`). PostgreSQL
    parses a statement again under another search_path, but a named one may not change its result type:
    shared by clients of a schema per tenant (`SET LOCAL search_path` at the start of each transaction,
    the way to choose a tenant in transaction pooling) whose tables differ, each would fail the other's
    turn with 0A000. Statements prepared earlier keep theirs (`ClientStatements.set_context`), as
    PostgreSQL keeps them. The context goes back to the one of `client.settings` when the transaction
    ends (`at_idle`), a session SET having been read back by then."""
    found = _search_path_after(statement)
    if found is None:
        return
    st = _state(client)
    st.search_path = (f"{_UNKNOWN_PATH}{next(_unknown_paths)}",) if found == (_UNKNOWN_PATH,) else found
    if client.prepared is not None:
        client.prepared.set_context(prepare_context(client))


def _search_path_after(statement: Statement) -> tuple[str | None] | None:
    """The search_path `statement` leaves for the rest of its transaction: `(value,)`, `(None,)` for the
    default, `(_UNKNOWN_PATH,)` when it cannot be read from the text; None when it sets none."""
    found: tuple[str | None] | None = None
    texts = [statement] if statement.statement_count <= 1 else [Statement(t) for t in statement.statements]
    for one in texts:
        keyword = one.first_keyword
        if keyword == "SET" or keyword == "RESET":
            changes = setting_changes(one.text)
            if changes is None:
                if one.keywords[1:2] == ("ALL",):
                    found = (None,)  # RESET ALL
                elif one.mentions("search_path") or one.mentions("schema"):
                    found = (_UNKNOWN_PATH,)  # a parameter, an expression
                continue
            for change in changes:
                if change.name == "search_path":
                    found = (change.value,)
        elif keyword == "DISCARD":
            if one.keywords[1:2] == ("ALL",):
                found = (None,)
        elif one.mentions("set_config") and one.mentions("search_path"):
            found = (_UNKNOWN_PATH,)
    return found


def prepare_context(client: ClientConnection) -> bytes:
    """The `parse_context` of the statements `client` prepares now: of its settings, and of the search_path
    its transaction set (`search_path_set`)."""
    st = client.session
    if st is None or st.search_path is None:
        return parse_context(client.settings)
    settings = dict(client.settings)
    value = st.search_path[0]
    if value is None:
        settings.pop("search_path", None)
    else:
        settings["search_path"] = value
    return parse_context(settings)


def unlisten_outcome(client: ClientConnection, statement: Statement) -> None:
    """A statement of a transaction that UNLISTENed emulated channels: a ROLLBACK (or ABORT) of the
    transaction undoes the UNLISTEN; ROLLBACK TO SAVEPOINT is taken as keeping it."""
    st = client.session
    assert st is not None
    words = statement.keywords
    if words and words[0] in ("ROLLBACK", "ABORT") and (len(words) < 2 or words[1] not in ("TO", "PREPARED")):
        st.unlisten_undone = True
    elif words and words[0] == "ROLLBACK" and words[1] == "TO":
        st.unlisten_undone = False  # back at a savepoint: the failed part is undone, the rest stands


def failed_in_transaction(client: ClientConnection) -> None:
    """The linked server reported an error: a transaction that UNLISTENed will not commit that way."""
    st = client.session
    if st is not None and st.unlistening is not None:
        st.unlisten_undone = True


def _end_unlisten(client: ClientConnection, st: SessionState) -> None:
    """The transaction that UNLISTENed is over: the channels stop unless it was rolled back."""
    channels, st.unlistening = st.unlistening, None
    undone, st.unlisten_undone = st.unlisten_undone, False
    if channels is None or undone:
        return
    channels &= st.listening
    st.listening -= channels
    client.app.listeners.unsubscribe(client, channels)


def parameter_changed(client: ClientConnection, name: str) -> None:
    """The server reported a new value of a reported setting while serving this client."""
    lowered = name.lower()
    if lowered in _NOT_SETTINGS:
        return
    _state(client).capture.add(lowered)
    client.session_due = True


def on_link(client: ClientConnection, server: ServerConnection) -> None:
    """A server was just linked (after the settings query went out): prepare the client's SQL statements."""
    st = client.session
    if st is None or not st.prepared:
        return
    sql = prepare_sql(list(st.prepared.values()))
    server.run_internal(sql, lambda rows, error: _prepared_again(client, error))
    st.prepare_seen = True
    client.session_due = True


def _prepared_again(client: ClientConnection, error: str | None) -> None:
    if error:
        # as on a server where an object it uses was dropped: EXECUTE will say what is missing
        log.info("%r: could not prepare its statements again: %s", client, error)


# --- the end of a transaction ---------------------------------------------------------------------------


def at_idle(client: ClientConnection) -> None:
    """The linked server is idle and the client has nothing in flight (a transaction just ended)."""
    server = client.server
    assert server is not None
    st = client.session
    assert st is not None
    if st.unlistening is not None:
        _end_unlisten(client, st)
    if st.search_path is not None:
        st.search_path = None  # what lasts of it is in client.settings once read back
        if client.prepared is not None:
            client.prepared.set_context(parse_context(client.settings))
    if client.session_due:
        client.session_due = False
        _read_back(client, server, st)
        return
    if st.cleaning:
        return  # the shared listener's answer goes on from here
    if not client.pinned:
        if st.listen_seen or st.prepare_seen:
            _clean_up(client, server, st)
            return
        client.release()
    flush(client)


def _read_back(client: ClientConnection, server: ServerConnection, st: SessionState) -> None:
    names = st.capture
    if st.capture_all:
        names = names | set(client.settings) | set(server.settings)
    st.capture = set()
    st.capture_all = False
    features = sorted(f for f in st.pins if f in _CHECKABLE) if st.check else []
    st.check = False
    if not (names or features or st.listen_seen or st.prepare_seen):
        _maybe_unpin(client, st)
        _done(client, server)
        return
    sql = boundary_sql(
        sorted(names),
        features,
        listen=st.listen_seen,
        prepared=st.prepare_seen,
        server_user=server.pool.info.target.server_user,
    )
    st.reading_on = server
    server.run_internal(sql, lambda rows, error: _read_back_done(client, server, rows, error))


def _answered(client: ClientConnection, server: ServerConnection) -> SessionState | None:
    """The client's session state once halephant's own query on `server` has its answer; None when the
    client left meanwhile (its server was dealt with then)."""
    st = client.session
    assert st is not None
    if st.reading_on is server:
        st.reading_on = None
    return st if client.server is server else None


def _read_back_done(
    client: ClientConnection, server: ServerConnection, rows: list[list[str | None]], error: str | None
) -> None:
    st = _answered(client, server)
    if st is None:
        return
    if error is not None:
        log.warning("%r: could not read its session state back: %s", client, error)
        st.broken = error
        _hold(client, st, SESSION_PIN, f"session state unknown: {error}")
        return
    channels: set[str] = set()
    prepared: dict[str, str] = {}
    restored = False
    for row in rows:
        kind, name, value, extra = [*row, None, None, None, None][:4]
        if name is None:
            continue
        if kind != KIND_FEATURE:
            name = text_value(name)
            value = None if value is None else text_value(value)
        if kind == KIND_SETTING:
            if _setting_read(client, server, st, name, value, extra):
                restored = True
        elif kind == KIND_LISTEN:
            channels.add(name)
        elif kind == KIND_PREPARED and value is not None:
            prepared[name] = value
        elif kind == KIND_FEATURE and value == "0" and name in st.pins:
            log.info("%r: released %s (%s)", client, name, st.pins.pop(name))
    if client.prepared is not None:
        client.prepared.set_context(prepare_context(client))
    if st.listen_seen:
        # While the client keeps this server, the server's own LISTEN delivers; the shared listener
        # takes over only when the server goes back (`_clean_up`), so nothing arrives twice.
        st.server_channels = channels
    if st.prepare_seen:
        st.prepared = prepared
    if restored:
        _restore_startup(client, server, st)
        return
    _maybe_unpin(client, st)
    _clean_up(client, server, st)


def _maybe_unpin(client: ClientConnection, st: SessionState) -> None:
    if client.pinned and st.owns_pin and not st.pins:
        st.owns_pin = False
        client.unpin("every session-bound feature was released")


def _setting_read(
    client: ClientConnection,
    server: ServerConnection,
    st: SessionState,
    name: str,
    value: str | None,
    source: str | None,
) -> bool:
    """Record a setting read back; True when the client reset one it gave at startup (which goes back
    to its startup value)."""
    if not st.settings_owned:
        st.startup = client.settings  # never changed from here on: a copy becomes the client's
        client.settings = dict(client.settings)
        if client.info is not None:
            client.info.settings = client.settings  # what plugins see (routing reads it)
        st.settings_owned = True
    if value is None or (source is not None and source != "session"):
        # back at the server's own value (RESET, RESET ALL, DISCARD ALL, SET ... TO DEFAULT)
        server.settings.pop(name, None)
        given = st.startup.get(name)
        if given is None:
            client.settings.pop(name, None)  # the pool default, as the client's own default
            return False
        # Connected directly, RESET goes back to the value the session got at startup, not the
        # server's default (an asyncpg pool's RESET ALL must leave the search_path it connected with)
        client.settings[name] = given
        if given == value:
            server.settings[name] = given  # the server's own value is the one given: nothing to set
            return False
        return True
    client.settings[name] = value
    server.settings[name] = value
    return False


def _restore_startup(client: ClientConnection, server: ServerConnection, st: SessionState) -> None:
    """The transaction reset settings the client gave at startup: set them again on this server before
    anything else runs there (the client's next transaction waits, as for the read-back), so that the
    server's record is the client's again and the server goes back as any other. The client is told the
    reported ones (application_name, TimeZone, DateStyle...) as PostgreSQL tells them after a RESET."""
    sql = settings_sql(server.settings, client.settings)
    server.settings = dict(client.settings)
    st.reading_on = server
    before = dict(server.params)
    server.run_internal(sql, lambda rows, error: _startup_restored(client, server, before, error))


def _startup_restored(
    client: ClientConnection, server: ServerConnection, before: dict[str, str], error: str | None
) -> None:
    st = _answered(client, server)
    if st is None:
        return
    if error is not None:
        # Rolled back as a whole: the server holds the pool's defaults, with which the client would read
        # or write as another client. As when its settings cannot be applied on a server it gets: closed
        # with the error; its server, whose record of settings is wrong now, gets `server_reset_query`
        # (`on_leave`), which clears that record.
        log.warning("%r: could not set its startup settings again: %s", client, error)
        st.broken = error
        code, _, message = error.partition(" ")
        client.fail(ClientError(code or sqlstate.INTERNAL_ERROR, message or error, fatal=True))
        return
    client.report_changed_parameters(server, before)
    _maybe_unpin(client, st)
    _clean_up(client, server, st)


def _clean_up(client: ClientConnection, server: ServerConnection, st: SessionState) -> None:
    """Before the server goes back: undo emulated LISTEN and SQL PREPARE (a pinned client keeps them)."""
    if client.pinned or not (st.listen_seen or st.prepare_seen):
        _done(client, server)
        return
    if st.listen_seen and st.server_channels - st.listening:
        # the shared listener must be listening before the server stops, or a notification could be lost
        st.cleaning = True
        client.app.listeners.when_active(
            client, st.server_channels, lambda ok: _clean_up_now(client, server, st, ok)
        )
        return
    _clean_up_now(client, server, st, True)


def _clean_up_now(
    client: ClientConnection, server: ServerConnection, st: SessionState, ok: bool, flushed: bool = False
) -> None:
    st.cleaning = False
    if client.server is not server:
        return
    if not ok:
        _hold(client, st, LISTEN, "listen: the shared listener connection is not available")
        client.resume_held()  # it keeps this server: what it sent meanwhile goes there
        return
    if not _idle(client, server):
        client.session_due = True  # the client went on meanwhile: clean up at the end of that
        return
    if client.session_due:
        at_idle(client)  # read back what the client did meanwhile first
        return
    new = st.server_channels - st.listening
    if new and not flushed:
        # The shared listener skipped what was committed before it started listening: the server must
        # deliver all of that before it stops. A backend reads the notification queue only when
        # signalled, and the notifier's signal may come late (after the UNLISTEN, which would drop
        # it): a NOTIFY of the server's own makes it read the whole queue before this query's
        # ReadyForQuery, while it still listens (what it delivers is relayed to the client).
        st.cleaning = True
        server.run_internal(
            f"NOTIFY {HANDOVER_CHANNEL}",
            lambda rows, error: _clean_up_now(client, server, st, error is None, flushed=True),
        )
        return
    if new:
        # from now on the shared listener delivers; what the server still sends until its UNLISTEN
        # reaches the client too, once (`late_notification`)
        client.app.listeners.subscribe(client, new)
        st.listening |= new
        st.handed_over.clear()
        st.handover_until = time.monotonic() + RELAYED_SECONDS
    st.server_channels = set()
    if st.listen_seen:
        # a LISTEN rolled back, or undone by the client itself, leaves nothing on the shared listener
        client.app.listeners.settle(client)
    sql = cleanup_sql(listen=st.listen_seen, prepared=st.prepare_seen)
    st.listen_seen = st.prepare_seen = False
    # The server leaves the client now: whatever the client sends next gets a server (maybe this one)
    # through a checkout, which prepares its statements again. The server is closed if this fails.
    client.release(
        reset=sql, notifications=(lambda message: late_notification(client, message)) if new else None
    )


def _idle(client: ClientConnection, server: ServerConnection) -> bool:
    """The client is between transactions on this server, with nothing in flight."""
    return (
        client.server is server
        and not client.outstanding
        and not client.unsynced
        and not server.absorb
        and server.scanner.status == codes.TX_IDLE
        and server.scanner.at_boundary
    )


def _done(client: ClientConnection, server: ServerConnection) -> None:
    """Release the server if the client still has nothing in flight on it."""
    if _idle(client, server):
        if client.session_due:
            at_idle(client)
            return
        if not client.pinned:
            client.release()
        flush(client)


# --- leaving -------------------------------------------------------------------------------------------


def on_leave(client: ClientConnection) -> str | None:
    """What to run on the client's (clean, pinned) server before it goes back: a targeted reset query,
    "" for the pool's `server_reset_query`, or None when the server must be closed instead."""
    st = client.session
    if st is None or st.broken or SESSION_PIN in st.pins or (client.pinned and not st.owns_pin):
        return ""
    features = list(st.pins)
    if st.listen_seen:
        features.append(LISTEN)
    if st.prepare_seen:
        features.append(PREPARE)
    return reset_sql(sorted(set(features)))


def forget(client: ClientConnection) -> None:
    """The client is gone: stop delivering its notifications."""
    st = client.session
    if st is not None and st.listening:
        client.app.listeners.unsubscribe(client, st.listening)
        st.listening = set()
    if st is not None and st.listen_seen:  # left in the middle of a transaction that LISTENed
        client.app.listeners.settle(client)


def pin_session(client: ClientConnection, reason: str) -> None:
    """Pin for the rest of the session, for something halephant cannot check on the server."""
    st = _state(client)
    if SESSION_PIN not in st.pins:
        _hold(client, st, SESSION_PIN, reason)


# --- notifications -------------------------------------------------------------------------------------


def relayed(client: ClientConnection, payload: bytes) -> None:
    """The client's own server delivered this notification (its LISTEN, before the shared listener took
    over): remember it, so that the shared listener's copy is not delivered a second time."""
    st = client.session
    if st is not None and (st.listen_seen or st.listening or st.server_channels):
        st.relayed.append((time.monotonic(), bytes(payload)))


def _cancel_copy(copies: deque[tuple[float, bytes]], payload: bytes) -> bool:
    """Whether `copies` (time, payload), those of the last RELAYED_SECONDS, hold this notification: one
    copy delivered by the other source cancels one, which is taken out."""
    horizon = time.monotonic() - RELAYED_SECONDS
    while copies and copies[0][0] < horizon:
        copies.popleft()
    for entry in copies:
        if entry[1] == payload:
            copies.remove(entry)
            return True
    return False


def deliver(client: ClientConnection, message: bytes) -> None:
    """A NotificationResponse for this client from the shared listener."""
    st = client.session
    if st is None or client.is_closed:
        return
    encoding = client.settings.get("client_encoding")
    if encoding is not None:
        codec = codec_of(encoding)
        if codec is not None:  # the shared listener's is UTF-8; PostgreSQL sends the client's
            message = notification_for(message, codec)
    if st.relayed and _cancel_copy(st.relayed, message[5:]):
        return  # the client's own server delivered this one
    if st.handover_until:
        now = time.monotonic()
        if now < st.handover_until:
            st.handed_over.append((now, message[5:]))
        else:
            st.handover_until = 0.0
            st.handed_over.clear()
    _write_notification(client, st, message)


def late_notification(client: ClientConnection, message: bytes) -> None:
    """A NotificationResponse the client's former server sent while its LISTENs were being undone:
    delivered unless the shared listener delivered that one already (then it is remembered, so that the
    shared listener's copy, if it comes later, is not delivered a second time)."""
    st = client.session
    if st is None or client.is_closed:
        return
    payload = message[5:]
    if _cancel_copy(st.handed_over, payload):
        return  # the shared listener delivered this one
    st.relayed.append((time.monotonic(), bytes(payload)))
    _write_notification(client, st, message)


def _write_notification(client: ClientConnection, st: SessionState, message: bytes) -> None:
    if not st.queue and client.server is None and not client.write_paused and client.waiting_pool is None:
        client.send(message)
        return
    st.queue.append(message)
    st.queued_bytes += len(message)
    if len(st.queue) > MAX_QUEUED_NOTIFICATIONS or st.queued_bytes > MAX_QUEUED_NOTIFICATION_BYTES:
        st.queue.clear()
        st.queued_bytes = 0
        log.warning("%r: notification queue full: disconnecting", client)
        client.fail(
            ClientError(
                sqlstate.PROGRAM_LIMIT_EXCEEDED,
                "too many notifications waiting for this client",
                hint="The client did not read its notifications; it must read them (or UNLISTEN) "
                f"to stay below {MAX_QUEUED_NOTIFICATIONS} waiting notifications.",
                fatal=True,
            )
        )


def flush(client: ClientConnection) -> None:
    """Write waiting notifications, now that the client is between transactions and reading."""
    st = client.session
    if st is None or not st.queue or client.write_paused or client.is_closed:
        return
    server = client.server
    if server is not None and (
        client.outstanding or server.scanner.status != codes.TX_IDLE or not server.scanner.at_boundary
    ):
        return  # inside a transaction or a response: notifications wait, as PostgreSQL makes them
    out = b"".join(st.queue)
    st.queue.clear()
    st.queued_bytes = 0
    client.send(out)
