"""Every hook specification halephant calls, and nothing else.

Rules: hooks are synchronous and never block; they are called with keyword arguments only (an
implementation may accept any subset). Decision hooks are ``firstresult``: the first non-None answer wins,
``None`` means "not mine", and the defaults in ``plugins/`` are registered ``trylast`` so any installed
plugin gets the first word. When no plugin answers a required decision the core fails closed.
A hook call costs about 2 µs, so none is called per protocol message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from halephant import PROJECT

if TYPE_CHECKING:
    from pydantic import BaseModel

    from halephant.types import (
        AuthMethod,
        ClientInfo,
        ClusterView,
        Config,
        PoolInfo,
        PoolSize,
        PoolTarget,
        Reject,
        Route,
        Statement,
        StatusPanel,
        TransactionInfo,
        Verdict,
    )

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def halephant_plugin_settings() -> tuple[str, type[BaseModel]] | None:
    """Declare this plugin's settings section ``plugins.<name>`` in halephant.yaml.

    Called once per config load (start-up and every reload), before validation; all results are collected.

    :returns: ``(name, model)``: the section name (by convention the plugin's own name: its entry-point
        name, or its module's name under ``plugins.modules``) and a pydantic model that validates it.
        Use ``extra="forbid"`` so that a misspelt key is an error, and put every constraint in the model
        (``Field(ge=1)``, validators): ``halephant check`` then reports each mistake at its
        file:line:col like any other, with a did-you-mean for unknown keys, where an error raised later
        in ``halephant_configure`` can only name ``plugins``. A section left out of the file gets the
        model's defaults (so a model with required fields makes the section required while the plugin
        is loaded). Two plugins may not declare the same name. The validated section is available as
        ``config.plugin_settings(name)``, an instance of ``model`` (typed ``BaseModel | None``: narrow
        it with ``isinstance``).

    Default: ``plugins/cursor_guard.py`` declares ``plugins.cursor_guard``.
    """


@hookspec
def halephant_configure(config: Config) -> None:
    """Take notice of a configuration that has just been loaded and validated.

    Called at start-up (``halephant check`` calls it too, and ``run`` before it serves) and after every
    reload, before any client uses it; all implementations are called, maybe more than once with the same
    configuration. Cache derived settings here (in a module-level object, replaced whole, so that other
    hooks see the old settings or the new ones, never a mixture) rather than reading them per
    statement. Since ``check`` calls it too, it is no place to start threads or open connections.
    Raising refuses the configuration: ``check`` and ``run`` report it, naming the plugin, at
    ``plugins`` in the file (at its ``plugins.modules`` entry when it is loaded from there), a reload
    keeps the previous configuration.

    :param config: the validated configuration.

    Default: ``plugins/cursor_guard.py`` reads its ``action`` setting.
    """


@hookspec(firstresult=True)
def halephant_select_pool(client: ClientInfo, config: Config) -> PoolTarget | Reject | None:
    """Choose the pool a client's session uses: database-based routing.

    Called once per client, right after its StartupMessage and before authentication. Stops at the first
    non-None result.

    :param client: user, database and startup parameters of the client, and ``client.tls``: the TLS
        version its connection uses (``"TLSv1.3"``), or None when it connected without TLS.
    :param config: the current configuration.
    :returns: a ``PoolTarget`` (the ``databases:`` entry, its cluster, the upstream database and user and
        the password halephant logs in with, the pool mode; for a database ``databases:`` does not list,
        ``entry`` names the entry whose settings its pools follow), or ``Reject`` (for an unknown
        database, 3D000; the core sends it only after authentication, as PostgreSQL does).

    Default: ``plugins/database_routing.py``.
    """


@hookspec(firstresult=True)
def halephant_authenticate(
    client: ClientInfo, pool: PoolTarget | None, config: Config
) -> AuthMethod | Reject | None:
    """Choose how a client proves who it is.

    Called once per client, after ``halephant_select_pool``. Stops at the first non-None result. The hook
    decides only; the core runs the exchange.

    :param client: the client. ``client.tls`` is the TLS version of its connection (``"TLSv1.3"``), or
        None when it connected without TLS: answer ``Reject`` (28000) to require TLS of some users
        or databases only, where ``client_tls.mode: require`` requires it of everyone.
    :param pool: the pool chosen for it, or None when pool selection rejected it (authenticate anyway so
        that database names cannot be probed without a password).
    :param config: the current configuration.
    :returns: ``ScramSha256(secret)``, ``Md5(secret)`` or ``Trust()`` from ``halephant.types`` (a ``None``
        secret runs a mock exchange that fails with 28P01), ``LookUp(auth_user, dbname, query,
        cache_for)`` to have the core look the password up in PostgreSQL first (it logs in to the
        primary of ``pool``'s cluster as ``auth_user``, runs ``query`` with the user name as ``$1``,
        then runs SCRAM or md5 against the verifier or hash found, the mock exchange when none is
        found, and logs in upstream as that user by pass-through; the hook is not called again for
        the answer), ``Cert()`` to let the client in on its TLS client certificate alone (verified by
        ``client_tls.ca_file``, its CN the user name; otherwise FATAL 28000), ``Peer(map)`` to let a
        client on the Unix-domain socket in on its operating system user alone (read from the kernel
        with ``SO_PEERCRED``: without a map its name must be the user name, with a ``UserMap`` the map
        must allow the pair, as pg_ident.conf's; otherwise, and over TCP, FATAL 28000 ``Peer
        authentication failed for user "..."``), or ``Reject`` (told at once, before any password is
        asked for).

    Default: ``plugins/scram_auth.py`` (users from ``users:``; a user not listed there is looked up
    where its database's entry sets ``auth_user``), asked after ``plugins/hba.py`` (the rules of the
    pg_hba.conf-style file ``plugins.hba.file``, when one is set: ``Reject``, ``Trust``, ``Cert``,
    ``Peer`` with the maps of the pg_ident.conf-style file ``plugins.hba.ident_file``, or None to leave
    the password exchange to ``scram_auth``).
    """


@hookspec(firstresult=True)
def halephant_route(
    client: ClientInfo, transaction: TransactionInfo, pool: PoolInfo, cluster: ClusterView
) -> Route | Reject | None:
    """Choose the kind of node that runs a transaction.

    Called once per transaction, at its first message, in transaction pooling; once per session (at its
    first message) in session pooling. Stops at the first non-None result.

    :param client: the client; ``client.settings`` are its session's settings as the core carries
        them (startup ones, and every one it changed as the server read it back at the end of each
        transaction, so a rolled-back SET does not show), while ``client.params`` and
        ``client.application_name`` are what its startup packet said: a ``SET application_name`` shows
        in ``client.settings["application_name"]`` from the next transaction on, never in
        ``client.application_name``.
    :param transaction: the transaction's first statement, when it starts with Query or Parse, or with a
        Bind of a statement the client prepared by name.
    :param pool: the client's pool.
    :param cluster: the nodes of the pool's cluster as last seen (roles, which are usable, their lag);
        ``cluster.primary`` and ``cluster.replicas`` say what can take the transaction now.
    :returns: ``Route(role, reason)``, or ``Reject`` (e.g. 25006 for a write on a read-only route).
        The core picks the node: the elected primary, or the usable replica with the fewest active
        server connections. A ``REPLICA`` route while ``cluster.replicas`` is empty fails the
        transaction with 57P03; a ``PRIMARY`` route while no primary is known waits for one up to
        ``checkout_timeout``, then fails with 57P03.

    Default: ``plugins/replica_routing.py``.
    """


@hookspec(firstresult=True)
def halephant_pool_size(pool: PoolTarget, config: Config) -> PoolSize | None:
    """Size a pool (per database, user and node).

    Called when a pool is first created (at the first client that needs it, not at start-up), again
    after each reload, and ``recheck_after`` seconds after an answer that set it (within a second); never
    per checkout. A ``databases:`` entry has a pool per user and per node (the primary and each
    replica), each asked for itself. Stops at the first non-None result.

    :param pool: the pool's target (``pool.database``, ``pool.pool_user``; ``config.database_for(
        pool.entry_name)`` is the ``databases:`` entry whose settings it follows).
    :param config: the current configuration.
    :returns: ``PoolSize(min, max, reserve, reason, recheck_after)``, whole numbers with ``max`` 1 or
        more, ``min`` from 0 to ``max`` and ``reserve`` 0 or more; ``recheck_after`` (None, or seconds
        more than 0) asks again that long after this answer, for a size that changes by itself (the
        time of day) and needs no reload. Any other answer fails the clients of that pool with XX000
        (a reload keeps the previous configuration; a recheck keeps the pool's size and logs why).
        A new size is applied as a reload applies one, and logged with its ``reason``.

    Default: ``plugins/pool_sizing.py`` (from ``databases.<name>.pool_size``, ``min_pool_size`` and
    ``reserve_pool_size``).
    """


@hookspec(firstresult=True)
def halephant_inspect_query(client: ClientInfo, statement: Statement, pool: PoolInfo) -> Verdict | None:
    """Decide whether a statement may run.

    Called once per simple-protocol Query and once per Parse, before the message is forwarded; never for
    Bind, Execute, Sync or server messages. Stops at the first non-None result. Not called at all when no
    plugin implements it.

    :param client: the client; plugins keep per-client state in ``client.stash``.
    :param statement: the SQL text with cheap lexical facts (``first_keyword``,
        ``declares_holdable_cursor``) and a lazy, size-capped ``ast``. A simple Query may carry several
        statements (``SELECT 1; TRUNCATE t``) and ``first_keyword`` is the first one's only: a policy
        about kinds of statement checks ``statement.first_keywords`` (one per statement).
    :param pool: the client's pool, including its ``mode``.
    :returns: ``None`` for no objection; ``Allow(reason)`` to stop other inspectors; ``Reject(code,
        message, hint)`` to answer with an ErrorResponse instead of running it (the client stays usable);
        ``Pin(reason)`` to keep the server connection for the rest of the session;
        ``Pin(reason, feature=name)`` to keep it until the client releases that session-bound feature
        (a row of ``databases.<name>.session_features``: after a statement that may release it, such as
        UNLISTEN, ``pg_advisory_unlock``, CLOSE, DROP, RESET ROLE or DEALLOCATE, the core checks the
        server at the end of the transaction and gives it back once none of it is held);
        ``Unpin(reason)`` to drop this client's earlier feature-less ``Pin`` (the server goes back once
        the core has checked it holds nothing session-bound);
        ``CloseIdleServers(database, reason)`` to let it through after halephant's idle server connections
        to that upstream database are closed (so a ``DROP DATABASE`` does not fail on them).

    Most statements are `statement.plain` (one ordinary SELECT, INSERT, UPDATE, DELETE, VALUES, TABLE or
    WITH that leaves no session state). An implementation with nothing to say about those is marked
    ``@halephant.ignores_plain_statements`` and is then not called for them; when every implementation
    is marked, a plain statement costs no hook call at all. All the defaults are marked (each is tested
    to answer None for every plain statement); an unmarked implementation sees every statement.

    Pins are logged with their reason, and so are their releases. Whatever the answer, a transaction
    pool never hands on a server with session state: a statement that takes a feature nobody pinned,
    rejected or could emulate pins the client anyway, and settings are always carried with the client.

    Default: ``plugins/session_features.py``, ``plugins/cursor_guard.py``, ``plugins/replica_routing.py``,
    and ``plugins/database_routing.py``. session_features applies the table
    ``databases.<name>.session_features`` (LISTEN and SQL PREPARE emulated, advisory locks, temporary
    tables and SET ROLE pinned, LOAD rejected); cursor_guard its ``with_hold`` row (rejects ``DECLARE ...
    WITH HOLD`` in transaction pools, 0A000); replica_routing rejects switching a read-only user's
    session to read-write (25006) and follows ``SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY``;
    database_routing closes idle server connections to a
    database before a client's ``DROP DATABASE`` of it.
    """


@hookspec
def halephant_extend_status(snapshot: dict[str, Any]) -> StatusPanel | list[StatusPanel] | None:
    """Add panels to ``halephant status``.

    Called by ``halephant status`` (in its own process, not in the proxy) once per refresh, about once a
    second, and once for ``--once``; all results are collected and shown after the built-in panels, in
    plugin registration order. Not called for ``--json``. Must be quick: the view waits for it.

    :param snapshot: the document the admin API serves at ``/snapshot`` (``summary``, ``pools``, ``nodes``,
        ``clients_by_state``, ``queues``, ``decisions``, ``errors``), as decoded JSON.
    :returns: a ``StatusPanel`` or a list of them (title, columns, rows of strings, an optional note), or
        ``None`` to add nothing. A plugin that raises is shown as a one-line error panel; the view goes on.

    Default: none. ``examples/plugins/status_busiest_databases.py`` is an example.
    """
