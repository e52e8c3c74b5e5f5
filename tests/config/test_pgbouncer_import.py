"""`halephant import-pgbouncer`: pgbouncer.ini (and its auth_file) to halephant.yaml.

Each converted file is loaded as `halephant check` loads it (plugins included), its values compared with
the PgBouncer settings they come from, and the notes checked to name what was not carried over. The
inputs are the file `bench/bench.py` writes for PgBouncer, PgBouncer's own sample `pgbouncer.ini` with
its example entries switched on, and smaller files for one feature each.
"""

from __future__ import annotations

import base64
import os
import pathlib
import textwrap

import pytest
from click.testing import CliRunner
from support.tls import TlsFiles

from halephant.cli import load, main
from halephant.config import Config, HostPort
from halephant.config.pgbouncer_import import (
    Converted,
    ImportProblem,
    convert,
    format_duration,
    parse_connstring,
)

ZERO_KEY = base64.b64encode(bytes(32)).decode()
VERIFIER = f"SCRAM-SHA-256$4096:{base64.b64encode(b'saltsalt').decode()}${ZERO_KEY}:{ZERO_KEY}"
MD5 = "md5" + "0123456789abcdef" * 2


def converted(ini: str, userlist: str | None = None, **kwargs: object) -> Converted:
    return convert(
        textwrap.dedent(ini),
        None if userlist is None else textwrap.dedent(userlist),
        auth_file_source="userlist.txt",
        **kwargs,  # type: ignore[arg-type]
    )


def checked(result: Converted, tmp_path: pathlib.Path) -> Config:
    """The converted file as `halephant check` loads it: plugins and their sections included."""
    path = tmp_path / "halephant.yaml"
    path.write_text(result.yaml)
    config, _plugins = load(str(path))
    return config


def notes(result: Converted) -> str:
    return "\n".join(str(note) for note in result.notes)


# --- bench/bench.py's PgBouncer ---------------------------------------------------------------------------

BENCH_INI = """\
[databases]
pgbench = host=127.0.0.1 port=54321 dbname=pgbench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 64321
unix_socket_dir =
auth_type = scram-sha-256
auth_file = /tmp/bench/pgbouncer/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 2000
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = /tmp/bench/pgbouncer/pgbouncer.log
log_connections = 0
log_disconnections = 0
max_prepared_statements = 200
client_tls_sslmode = require
client_tls_cert_file = {cert}
client_tls_key_file = {key}
server_tls_sslmode = require
"""


def test_bench_ini(tmp_path: pathlib.Path, tls_files: TlsFiles) -> None:
    ini = BENCH_INI.format(cert=tls_files.cert_file, key=tls_files.key_file)
    result = converted(ini, f'"bench" "{VERIFIER}"\n')
    config = checked(result, tmp_path)
    assert config.listen == HostPort(host="127.0.0.1", port=64321)
    assert config.unix_socket_dir is None  # unix_socket_dir = (empty): no socket
    assert [str(n) for n in config.clusters["main"].nodes] == ["127.0.0.1:54321"]
    assert config.clusters["main"].tls.mode == "require"
    db = config.databases["pgbench"]
    assert (db.cluster, db.server_database, db.mode, db.pool_size) == ("main", "pgbench", "transaction", 20)
    assert db.max_db_connections is None  # 0: no cap
    assert db.max_prepared_statements == 200
    assert db.idle_timeout == 600 and db.checkout_timeout == 120  # PgBouncer's defaults
    user = config.users["bench"]
    assert (user.password, user.auth, user.server_password) == (VERIFIER, "scram-sha-256", None)
    assert config.limits.max_client_conn == 2000
    assert config.limits.login_timeout == 60 and config.limits.server_login_retry == 15
    assert config.client_tls.mode == "require"
    assert config.client_tls.cert_file == tls_files.cert_file
    text = notes(result)
    for key in ("ignore_startup_parameters", "logfile", "log_connections", "log_disconnections"):
        assert f": {key}: " in text
    assert "halephant needs none" in text
    # each note in the header, with the line it comes from
    assert "#   <ini>:14: ignore_startup_parameters:" in result.yaml.replace("pgbouncer.ini", "<ini>")
    assert "max_client_conn: 2000 # max_client_conn = 2000 (pgbouncer.ini:12)" in result.yaml


# --- PgBouncer's sample pgbouncer.ini, its examples switched on ---------------------------------------------

SAMPLE_INI = """\
;; database name = connect string
;;
;; connect string params:
;;   dbname= host= port= user= password= auth_user=
;;   client_encoding= datestyle= timezone=
;;   pool_size= reserve_pool= max_db_connections=
;;   pool_mode= connect_query= application_name=
[databases]

;; foodb over Unix socket
foodb =

;; redirect bardb to bazdb on localhost
bardb = host=localhost dbname=bazdb

;; access to dest database will go with single user
forcedb = host=localhost port=300 user=baz password=foo client_encoding=UNICODE datestyle=ISO {connect_query}

;; use custom pool sizes
nondefaultdb = pool_size=50 reserve_pool=10

;; use auth_user with auth_query if user not present in auth_file
;; auth_user must exist in auth_file
authdb = host=localhost auth_user=bar

;; fallback connect string
* = host=testserver

;; User-specific configuration
[users]

user1 = pool_mode=session max_user_connections=4

[peers]
1 = host=host1.example.com

;; Configuration section
[pgbouncer]

;;;
;;; Administrative settings
;;;

logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid

;;;
;;; Where to wait for clients
;;;

;; IP address or * which means all IPs
listen_addr = localhost
listen_port = 6432

;; Unix socket is also used for -R.
;; On Debian it should be /var/run/postgresql
unix_socket_dir = /tmp
unix_socket_mode = 0777
unix_socket_group =

;;;
;;; Authentication settings
;;;

;; any, trust, plain, md5, cert, hba, pam
auth_type = md5
auth_file = /etc/pgbouncer/userlist.txt

;; Query to use to fetch password from database.  Result
;; must have 2 columns - username and password hash.
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename=$1

;;;
;;; Users allowed into database 'pgbouncer'
;;;

admin_users = user2, someadmin, otheradmin
stats_users = stats, root

;;;
;;; Pooler personality questions
;;;

pool_mode = session
server_reset_query = DISCARD ALL
server_reset_query_always = 0
ignore_startup_parameters = extra_float_digits
server_check_query = select 1
server_check_delay = 30
application_name_add_host = 1

;;;
;;; Connection limits
;;;

max_client_conn = 100
default_pool_size = 20
min_pool_size = 0
reserve_pool_size = 0
reserve_pool_timeout = 5
max_db_connections = 0
max_user_connections = 0
server_round_robin = 0
syslog = 0
log_connections = 1
log_disconnections = 1
log_pooler_errors = 1
stats_period = 60
verbose = 0

;;;
;;; Timeouts
;;;

server_lifetime = 3600
server_idle_timeout = 600
server_connect_timeout = 15
server_login_retry = 15
query_timeout = 0
query_wait_timeout = 120
client_idle_timeout = 0
client_login_timeout = 60
autodb_idle_timeout = 3600

;;;
;;; Low-level tuning options
;;;

pkt_buf = 4096
max_packet_size = 2147483647
listen_backlog = 128
sbuf_loopcnt = 5
suspend_timeout = 10
tcp_defer_accept = 0
tcp_socket_buffer = 0
tcp_keepalive = 1
tcp_keepcnt = 0
tcp_keepidle = 0
tcp_keepintvl = 0
tcp_user_timeout = 0
dns_max_ttl = 15
dns_nxdomain_ttl = 15
"""

SAMPLE_USERLIST = f"""\
"user1" "{MD5}"
"user2" "plain-two"
"bar" "{MD5.replace("0", "f")}"
"stats" "{VERIFIER}"
"""


def test_sample_ini(tmp_path: pathlib.Path) -> None:
    result = converted(SAMPLE_INI.format(connect_query="connect_query='SELECT 1'"), SAMPLE_USERLIST)
    config = checked(result, tmp_path)
    assert config.listen == HostPort(host="localhost", port=6432)
    assert (config.unix_socket_dir, config.unix_socket_mode, config.unix_socket_group) == (
        "/tmp",
        "0777",
        None,
    )
    # one cluster per host list and port: foodb and nondefaultdb go over PgBouncer's own socket directory
    nodes = {name: [str(n) for n in c.nodes] for name, c in config.clusters.items()}
    # each cluster named after the first database it serves ('*': default)
    assert nodes == {
        "foodb": ["/tmp:5432"],
        "bardb": ["localhost:5432"],
        "forcedb": ["localhost:300"],
        "default": ["testserver:5432"],
    }
    dbs = config.databases
    assert dbs["foodb"].cluster == dbs["nondefaultdb"].cluster
    assert dbs["bardb"].cluster == dbs["authdb"].cluster
    assert dbs["bardb"].server_database == "bazdb"
    assert (dbs["nondefaultdb"].pool_size, dbs["nondefaultdb"].reserve_pool_size) == (50, 10)
    assert dbs["nondefaultdb"].reserve_pool_timeout == 5
    for db in dbs.values():
        assert db.mode == "session"
        assert db.idle_timeout == 600 and db.max_lifetime == 3600 and db.checkout_timeout == 120
        assert db.application_name_add_host is True
        assert db.max_db_connections is None
    assert "*" in dbs and dbs["*"].database is None
    # auth_user bar has an md5 hash: halephant can log in as it to run auth_query
    assert dbs["authdb"].auth_user == "bar"
    assert dbs["authdb"].auth_query == "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    users = config.users
    assert (users["user1"].auth, users["user1"].max_user_connections) == ("md5", 4)
    assert users["user2"].auth == "md5" and users["user2"].password == "plain-two"
    assert users["stats"].auth == "scram-sha-256"  # md5 with a SCRAM secret: PgBouncer uses SCRAM
    # forcedb's user=baz password=foo: a user of its own, the other databases are not forced
    assert users["baz"].password == "foo"
    assert all(u.server_user is None for u in users.values())
    assert config.admin.users == ("user2",)
    assert config.admin.stats_users == ("stats",)
    limits = config.limits
    assert (limits.max_client_conn, limits.login_timeout, limits.connect_timeout) == (100, 60, 15)
    assert limits.max_message_size == 2**31 - 1
    assert limits.tcp_keepalive is True
    text = notes(result)
    for mentioned in (
        "forcedb client_encoding=UNICODE",
        "forcedb datestyle=ISO",
        "forcedb connect_query=SELECT 1",
        "forcedb user=baz",
        "user1 pool_mode=session",
        "'someadmin' is not in the auth_file",
        "'root' is not in the auth_file",
        "[peers] 1",
        ": logfile:",
        ": pidfile:",
        ": server_check_query:",
        ": server_check_delay:",
        ": server_round_robin:",
        ": autodb_idle_timeout:",
        ": pkt_buf:",
        ": listen_backlog:",
        ": dns_max_ttl:",
        ": verbose:",
        ": stats_period:",
        ": ignore_startup_parameters:",
    ):
        assert mentioned in text, mentioned
    # carried settings are not noted
    for carried in (": max_client_conn:", ": server_lifetime:", ": tcp_keepalive:", ": auth_query:"):
        assert carried not in text


# --- one feature each -----------------------------------------------------------------------------------

MINIMAL = """\
[databases]
app = host=db.example.com dbname=app_prod

[pgbouncer]
auth_file = userlist.txt
"""


def test_pgbouncer_defaults_are_carried(tmp_path: pathlib.Path) -> None:
    result = converted(MINIMAL, '"app" "secret"\n')
    config = checked(result, tmp_path)
    db = config.databases["app"]
    assert (db.mode, db.pool_size, db.idle_timeout, db.checkout_timeout) == ("session", 20, 600, 120)
    assert config.limits.max_client_conn == 100
    assert config.users["app"].auth == "md5"  # PgBouncer's default auth_type
    # no listen_addr: PgBouncer listened on its Unix socket only
    assert config.listen == HostPort(host="127.0.0.1", port=6432)
    assert config.unix_socket_dir == "/tmp"
    assert "listen_addr: not set" in notes(result)
    assert "mode: session # pool_mode = session (PgBouncer's default)" in result.yaml


def test_durations_and_units(tmp_path: pathlib.Path) -> None:
    result = converted(
        MINIMAL
        + """\
        server_lifetime = 1800
        server_idle_timeout = 0
        query_wait_timeout = 2.5
        query_timeout = 90
        client_idle_timeout = 7200
        idle_transaction_timeout = 30s
        client_login_timeout = 0
        reserve_pool_size = 3
        reserve_pool_timeout = 0.25
        tcp_keepidle = 600
        tcp_keepintvl = 30
        tcp_keepcnt = 4
        tcp_user_timeout = 45000
        server_connect_timeout = 3
        server_login_retry = 1
        """.replace("        ", ""),
        '"app" "secret"\n',
    )
    config = checked(result, tmp_path)
    db = config.databases["app"]
    assert (db.max_lifetime, db.idle_timeout, db.checkout_timeout) == (1800, 300, 2.5)
    assert (db.reserve_pool_size, db.reserve_pool_timeout) == (3, 0.25)
    limits = config.limits
    assert (limits.query_timeout, limits.client_idle_timeout, limits.idle_transaction_timeout) == (
        90,
        7200,
        30,
    )
    assert limits.login_timeout == 15  # 0 (off) has no counterpart: halephant's default
    assert (limits.tcp_keepidle, limits.tcp_keepintvl, limits.tcp_keepcnt) == (600, 30, 4)
    assert limits.tcp_user_timeout == 45  # PgBouncer's is in milliseconds
    assert (limits.connect_timeout, limits.server_login_retry) == (3, 1)
    assert "max_lifetime: 30m" in result.yaml and "checkout_timeout: 2500ms" in result.yaml
    text = notes(result)
    assert ": server_idle_timeout: 0 (off)" in text and ": client_login_timeout: 0 (off)" in text


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 0.5, 30, 90, 600, 3600, 5400, 86400, 2.25)] == [
        "0s", "500ms", "30s", "1m30s", "10m", "1h", "1h30m", "1d", "2250ms"
    ]  # fmt: skip


def test_forced_user_on_every_database_becomes_server_user(tmp_path: pathlib.Path) -> None:
    ini = """\
    [databases]
    app = host=10.0.0.1 dbname=app user=app_owner password=owner-secret
    reports = host=10.0.0.1 dbname=app user=app_owner

    [pgbouncer]
    listen_addr = 0.0.0.0
    auth_type = scram-sha-256
    auth_file = userlist.txt
    max_user_connections = 40
    """
    userlist = f"""\
    "alice" "{VERIFIER}"
    "bob" "bob-secret"
    "app_owner" "{VERIFIER}"
    """
    result = converted(ini, userlist)
    config = checked(result, tmp_path)
    users = config.users
    assert users["alice"].server_user == "app_owner" and users["bob"].server_user == "app_owner"
    owner = users["app_owner"]
    assert (owner.password, owner.server_password, owner.server_user) == (VERIFIER, "owner-secret", None)
    assert owner.max_user_connections == 40
    assert users["alice"].max_user_connections is None  # an alias counts against its server_user
    assert len(config.clusters) == 1


def test_auth_types(tmp_path: pathlib.Path) -> None:
    userlist = f'"a" "plain"\n"b" "{MD5}"\n"c" "{VERIFIER}"\n'
    base = "[databases]\napp = host=h\n[pgbouncer]\nauth_file = u\nauth_type = {}\n"
    expect = {
        "md5": {"a": "md5", "b": "md5", "c": "scram-sha-256"},
        "scram-sha-256": {"a": "scram-sha-256", "b": "md5", "c": "scram-sha-256"},
        "plain": {"a": "scram-sha-256", "b": "md5", "c": "scram-sha-256"},
        "trust": {"a": "trust", "b": "trust", "c": "trust"},
    }
    for auth_type, auths in expect.items():
        result = converted(base.format(auth_type), userlist)
        config = checked(result, tmp_path)
        assert {name: u.auth for name, u in config.users.items()} == auths, auth_type
    trust = converted(base.format("trust"), userlist)
    assert "c: a SCRAM verifier cannot log in upstream" in notes(trust)
    assert "PgBouncer refused this user" in notes(converted(base.format("scram-sha-256"), userlist))
    assert "auth_type: plain" in notes(converted(base.format("plain"), userlist))


def test_hba(tmp_path: pathlib.Path) -> None:
    (tmp_path / "pg_hba.conf").write_text("host all all 127.0.0.1/32 scram-sha-256\n")
    ini = "[databases]\napp = host=h\n[pgbouncer]\nauth_file = u\nauth_type = hba\n"
    ini += "auth_hba_file = pg_hba.conf\n"
    result = converted(ini, '"a" "plain"\n', base_dir=str(tmp_path))
    config = checked(result, tmp_path)
    hba = config.plugin_settings("hba")
    assert hba is not None and getattr(hba, "file") == str(tmp_path / "pg_hba.conf")  # noqa: B009
    assert config.users["a"].auth == "scram-sha-256"


def test_tls_and_cert_auth(tmp_path: pathlib.Path, tls_files: TlsFiles) -> None:
    ini = f"""\
    [databases]
    app = host=pg1,pg2 port=5433
    [pgbouncer]
    listen_addr = 0.0.0.0
    auth_file = u
    auth_type = cert
    client_tls_sslmode = require
    client_tls_cert_file = {tls_files.cert_file}
    client_tls_key_file = {tls_files.key_file}
    client_tls_ca_file = {tls_files.ca_file}
    client_tls_protocols = tlsv1.3
    client_tls_ciphers = HIGH:!aNULL
    server_tls_sslmode = verify-ca
    server_tls_ca_file = {tls_files.ca_file}
    server_tls_protocols = secure
    server_tls_ciphers = fast
    """
    result = converted(ini, '"certuser" "pw"\n')
    config = checked(result, tmp_path)
    tls = config.client_tls
    assert (tls.mode, tls.ca_file, tls.min_version, tls.ciphers) == (
        "verify-full", tls_files.ca_file, "TLSv1.3", "HIGH:!aNULL"
    )  # fmt: skip
    cluster = config.clusters["main"]
    assert [str(n) for n in cluster.nodes] == ["pg1:5433", "pg2:5433"]
    assert (cluster.tls.mode, cluster.tls.ca_file, cluster.tls.min_version) == (
        "verify-ca", tls_files.ca_file, "TLSv1.2"
    )  # fmt: skip
    text = notes(result)
    assert "auth_type: cert" in text and "server_tls_ciphers: PgBouncer's shortcut 'fast'" in text
    assert "app host: PgBouncer spread connections over the hosts" in text


def test_reading_the_ini() -> None:
    files = {
        "extra.ini": "# included\nmax_client_conn = 500\n[databases]\nincluded = host=h2\n",
    }
    ini = """\
    ; comments start with ; or #
    # pool_mode = statement
    [PgBouncer]
    POOL_MODE = statement
    %include extra.ini
    [databases]
    "my db" = host=h1 dbname='our db' application_name='it\\'s' client_encoding = 'UTF8'
    [pgbouncer]
    auth_file = u
    auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename=$1; -- a ; later in a line is no comment
    max_client_conn = 600
    """
    result = converted(ini, '"a" "x"\n', include=lambda name, _src: (name, files[name]))
    dbs = result.yaml
    assert "my db:\n" in dbs and "database: our db" in dbs
    assert "max_client_conn: 600" in dbs  # the last one wins
    assert "mode: statement" in dbs and "included:" in dbs
    assert parse_connstring(r"a=1 b='x y' c = 'it\'s' d=\ e", "f", 1) == {
        "a": "1",
        "b": "x y",
        "c": "it's",
        "d": " e",
    }


@pytest.mark.parametrize(
    ("ini", "userlist", "where"),
    [
        ("[databases]\napp = host=h\n[pgbouncer]\nthis is not a setting\n", "", "pgbouncer.ini:4:"),
        ("max_client_conn = 5\n", "", "pgbouncer.ini:1: 'max_client_conn' comes before any [section]"),
        ("[databases]\napp = host='h\n", "", "pgbouncer.ini:2: unterminated"),
        (
            "[databases]\napp = host=h\n[pgbouncer]\nmax_client_conn = lots\n",
            '"a" "x"\n',
            "pgbouncer.ini:4: max_client_conn",
        ),
        (
            "[databases]\napp = host=h\n[pgbouncer]\npool_mode = sometimes\n",
            '"a" "x"\n',
            "pgbouncer.ini:4: pool_mode",
        ),
        ("[databases]\napp = host=h\n", '"a" "x"\n"b x\n', "userlist.txt:2:"),
        ("[databases]\napp = host=h\n", "", "no users to carry over"),
        ("[pgbouncer]\nauth_file = u\n", '"a" "x"\n', "no [databases] entry"),
    ],
)
def test_parse_errors(ini: str, userlist: str, where: str) -> None:
    with pytest.raises(ImportProblem) as excinfo:
        converted(ini, userlist)
    assert where in str(excinfo.value)


# --- the command ------------------------------------------------------------------------------------------


def test_command_writes_a_file_that_checks(tmp_path: pathlib.Path) -> None:
    (tmp_path / "userlist.txt").write_text(f'"app" "{VERIFIER}"\n')
    (tmp_path / "pgbouncer.ini").write_text(MINIMAL + "logfile = /var/log/pgbouncer.log\n")
    out = tmp_path / "halephant.yaml"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # auth_file = userlist.txt is relative to the working directory, as in PgBouncer
    try:
        result = CliRunner().invoke(main, ["import-pgbouncer", "pgbouncer.ini", "-o", str(out)])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert "note: pgbouncer.ini:6: logfile:" in result.output
    check = CliRunner().invoke(main, ["check", "-c", str(out)])
    assert check.exit_code == 0, check.output


def test_command_reports_unreadable_files(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.ini"
    result = CliRunner().invoke(main, ["import-pgbouncer", str(missing)])
    assert result.exit_code == 1
    assert f"{missing}: cannot read it" in result.output
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\napp = host=h\n[pgbouncer]\nauth_file = /nonexistent/userlist.txt\n")
    result = CliRunner().invoke(main, ["import-pgbouncer", str(ini)])
    assert result.exit_code == 1
    assert f"{ini}:4: cannot read auth_file /nonexistent/userlist.txt" in result.output
    ini.write_text("[databases]\napp = host=h\n%include /nonexistent/more.ini\n")
    result = CliRunner().invoke(main, ["import-pgbouncer", str(ini)])
    assert result.exit_code == 1
    assert "cannot read %include /nonexistent/more.ini" in result.output


def test_command_checks_the_result_with_its_plugins(tmp_path: pathlib.Path) -> None:
    (tmp_path / "pg_hba.conf").write_text("host all all 127.0.0.1/32 scram-sha-256\n")
    (tmp_path / "userlist.txt").write_text('"app" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\napp = host=h\n[pgbouncer]\nauth_file = {tmp_path}/userlist.txt\n"
        f"auth_type = hba\nauth_hba_file = {tmp_path}/pg_hba.conf\n"
    )
    result = CliRunner().invoke(main, ["import-pgbouncer", str(ini)])
    assert result.exit_code == 0, result.output  # the hba plugin's section is checked by the plugin
    assert f"file: {tmp_path}/pg_hba.conf" in result.output
    # what would not load on this machine is reported, the file still written out
    ini.write_text(ini.read_text() + "unix_socket_group = no-such-group-here\n")
    result = CliRunner().invoke(main, ["import-pgbouncer", str(ini)])
    assert result.exit_code == 1
    assert "unix_socket_group: no group named 'no-such-group-here'" in result.output
