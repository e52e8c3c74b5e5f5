"""The `hba` plugin: its pg_hba.conf parser (every form, every error at its line), the decision of the
first matching line, and the file checked where the configuration loads (`plugins.hba.file`)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from halephant_plugins import hba
from halephant_plugins.hba import HbaError, HbaSettings, decide, parse_hba, parse_ident

from halephant import sqlstate
from halephant.config import ConfigError, read_config_text, validate_config
from halephant.types import (
    Cert,
    ClientInfo,
    Config,
    Peer,
    Reject,
    ScramSha256,
    Trust,
    UserMap,
    UserMapLine,
)

BASE = "clusters: {main: {nodes: [127.0.0.1:5432]}}\ndatabases: {app: {cluster: main}}\n"
USERS = (
    "users: {u: {password: secret}, hashed: {password: md5" + "0" * 32 + ", auth: md5},"
    " trusted: {auth: trust, server_password: x}}\n"
)


@pytest.fixture(autouse=True)
def _no_rules() -> Iterator[None]:
    yield
    hba._current.rules, hba._current.file = None, ""


def client(
    user: str = "u", database: str = "app", address: str = "127.0.0.1:50000", tls: str | None = None
) -> ClientInfo:
    return ClientInfo(user=user, database=database, params={}, address=address, tls=tls)


def config(tail: str = "", hba_file: Path | None = None, ident_file: Path | None = None) -> Config:
    text = BASE + USERS + tail
    if hba_file is not None:
        ident = f", ident_file: {ident_file}" if ident_file is not None else ""
        text += f"plugins: {{hba: {{file: {hba_file}{ident}}}}}\n"
    return validate_config(read_config_text(text, "halephant.yaml"), {"hba": HbaSettings})


# --- the parser --------------------------------------------------------------------------------------


def test_every_supported_form() -> None:
    rules = parse_hba(
        "# a comment\n"
        "\n"
        "local   all             all                          trust\n"
        'host    "my db",b, c    u1,"all"   10.0.0.0/8       md5   # trailing comment\n'
        "hostssl sameuser        all        ::1/128          cert clientcert=verify-full\n"
        "hostnossl all           all        192.168.1.0 255.255.255.0  reject\n"
        "host    all             all        all              scram-sha-256\n"
        "host    all             all        fe80:: ffff:ffff::  trust\n"
        "host    all             all        10.1.2.3         trust\n"
        "host    all             all        \\\n  10.0.0.0/8 trust\n",
        "f",
    )
    assert [r.line for r in rules] == [3, 4, 5, 6, 7, 8, 9, 10]
    local, names, cert, mask, every, v6mask, lone, continued = rules
    assert (local.type, local.databases, local.users, local.network, local.method) == (
        "local", None, None, None, "trust",
    )  # fmt: skip
    assert names.databases == {"my db", "b", "c"} and names.users == {"u1", "all"}  # quoted "all": a name
    assert names.network == ipaddress.ip_network("10.0.0.0/8")
    assert cert.sameuser and cert.databases == frozenset() and cert.method == "cert"
    assert cert.network == ipaddress.ip_network("::1/128")
    assert mask.network == ipaddress.ip_network("192.168.1.0/24") and mask.method == "reject"
    assert every.network is None and every.method == "scram-sha-256"
    assert v6mask.network == ipaddress.ip_network("fe80::/32")
    assert lone.network == ipaddress.ip_network("10.1.2.3/32")
    assert continued.network == ipaddress.ip_network("10.0.0.0/8")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("hots all all 1.2.3.4/32 trust", "invalid connection type 'hots'"),
        ("hostgssenc all all all trust", "'hostgssenc' is not supported by halephant"),
        ("host replication all all md5", "database 'replication' is not supported by halephant"),
        ("host @dbs all all md5", "file inclusion '@dbs' is not supported by halephant"),
        ("host all +admins all md5", "group membership '+admins' is not supported by halephant"),
        ("host samerole all all md5", "'samerole' is not supported by halephant"),
        ("host all all db.example.com md5", "host name 'db.example.com' is not supported by halephant"),
        ("host all all samenet md5", "'samenet' is not supported by halephant"),
        ("host all all 10.0.0.0/33 md5", "invalid CIDR mask in address '10.0.0.0/33'"),
        ("host all all 10.0.0.0 255.0.255.0 md5", "invalid IP mask '255.0.255.0'"),
        ("host all all 10.0.0.0 ffff:: md5", "IP address and mask do not match"),
        ("host all all 10.0.0.0/8 password", "method 'password' (cleartext) is not supported by halephant"),
        ("host all all 10.0.0.0/8 ldap", "method 'ldap' is not supported by halephant"),
        ("host all all 10.0.0.0/8 magic", "invalid authentication method 'magic'"),
        ("host all all 10.0.0.0/8 cert", "cert authentication is only supported on hostssl connections"),
        ("local all all cert", "cert authentication is only supported on hostssl connections"),
        ("host all all 10.0.0.0/8 md5 clientcert=verify-ca", "'clientcert=verify-ca' is not supported"),
        ("hostssl all all all cert map=x", "option 'map=x' is not supported by halephant"),
        ("host all all 10.0.0.0/8 peer", "peer authentication is only supported on local sockets"),
        ("hostssl all all all peer map=m", "peer authentication is only supported on local sockets"),
        ("local all all peer map=", "option 'map=' names no map"),
        ("local all all peer clientcert=verify-full", "'clientcert=verify-full' is not supported"),
        ("local all all peer map=m", None),
        ('host "app all all trust', "unterminated quoted string"),
        ("host app, other all all trust", None),  # a list continued after blanks (as PostgreSQL reads it)
        ("host app,", "a comma list ends with a comma"),
        ("host", "end-of-line before database specification"),
        ("local all", "end-of-line before role specification"),
        ("host all all", "end-of-line before IP address specification"),
        ("host all all 10.0.0.0/8", "end-of-line before authentication method"),
        ("host all all 10.0.0.0/8,10.0.0.1 md5", "multiple values in the address field"),
    ],
)
def test_each_error_at_its_line(line: str, message: str | None) -> None:
    text = "# rules\nlocal all all trust\n" + line + "\n"
    if message is None:
        assert len(parse_hba(text, "/etc/hba.conf")) == 2
        return
    with pytest.raises(HbaError) as caught:
        parse_hba(text, "/etc/hba.conf")
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("/etc/hba.conf:3: "), caught.value.problems
    assert message in caught.value.problems[0]


def test_every_problem_is_reported_not_just_the_first() -> None:
    with pytest.raises(HbaError) as caught:
        parse_hba("host all all all password\nlocal all all trust\nbogus\n", "/h")
    assert [p.split(": ")[0] for p in caught.value.problems] == ["/h:1", "/h:3"]


def test_peer_lines_and_their_maps() -> None:
    plain, mapped = parse_hba("local all all peer\nlocal all all peer map=staff\n", "f")
    assert (plain.method, plain.map) == ("peer", None)
    assert (mapped.method, mapped.map) == ("peer", "staff")


# --- the ident file ----------------------------------------------------------------------------------


def test_every_supported_ident_form() -> None:
    maps = parse_ident(
        "# MAPNAME SYSTEM-USERNAME PG-USERNAME\n"
        "\n"
        "staff   alice     app            # a comment\n"
        "staff   bob       all\n"
        'staff   carol     "all"\n'
        "mail    /^(.*)@example\\.com$   \\1\n"
        'mail    "/^([^,]+),x$"  \\1_x\n'
        "ro      dave      /_ro$\n"
        "ro      \\\n  erin  app_ro\n",
        "/etc/ident",
    )
    assert set(maps) == {"staff", "mail", "ro"}
    assert maps["staff"] == UserMap(
        "staff",
        (UserMapLine("alice", "app"), UserMapLine("bob", None), UserMapLine("carol", "all")),
    )
    mail = maps["mail"]
    assert mail.allows("alice@example.com", "alice") and not mail.allows("alice@example.org", "alice")
    assert mail.allows("a,x", "a_x")  # a quoted expression may hold a comma
    assert maps["ro"].allows("dave", "app_ro") and not maps["ro"].allows("dave", "app")
    assert maps["ro"].allows("erin", "app_ro")
    assert parse_ident("", "f") == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("m alice", "missing entry at end of line"),
        ("m", "missing entry at end of line"),
        ("m alice app extra", "extra field 'extra': a line is MAPNAME SYSTEM-USERNAME PG-USERNAME"),
        ("m alice,bob app", "multiple values in ident field"),
        ("m /^(a app", 'invalid regular expression "^(a"'),
        ("m alice /(x", 'invalid regular expression "(x"'),
        (
            "m /^alice$ \\1",
            'regular expression "^alice$" has no subexpressions as requested by backreference',
        ),
        ("m alice +admins", "group membership '+admins' is not supported by halephant"),
        ("m alice @users", "file inclusion '@users' is not supported by halephant"),
        ("include other.conf", "'include' is not supported by halephant"),
        ("include_dir conf.d", "'include_dir' is not supported by halephant"),
        ('m "alice app', "unterminated quoted string"),
        ('m alice ""', "empty PG-USERNAME"),
        ('m alice "+admins"', None),  # quoted: a name
    ],
)
def test_each_ident_error_at_its_line(line: str, message: str | None) -> None:
    text = "# maps\nm root app\n" + line + "\n"
    if message is None:
        assert len(parse_ident(text, "/etc/ident").get("m", UserMap("m")).lines) == 2
        return
    with pytest.raises(HbaError) as caught:
        parse_ident(text, "/etc/ident")
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("/etc/ident:3: "), caught.value.problems
    assert message in caught.value.problems[0], caught.value.problems


def test_every_ident_problem_is_reported() -> None:
    with pytest.raises(HbaError) as caught:
        parse_ident("m a\nm a b\nm /( b\n", "/i")
    assert [p.split(": ")[0] for p in caught.value.problems] == ["/i:1", "/i:3"]


# --- the decision ------------------------------------------------------------------------------------


def rules(text: str) -> tuple[hba.HbaLine, ...]:
    return parse_hba(text, "hba.conf")


def test_no_matching_line_is_28000_with_postgresqls_message() -> None:
    answer = decide(rules("host other all all md5\n"), client(), config())
    assert isinstance(answer, Reject) and answer.code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION
    assert (
        answer.message == 'no pg_hba.conf entry for host "127.0.0.1", user "u", database "app", no encryption'
    )
    assert answer.reason == "hba: no line of pg_hba.conf matches"
    tls = decide(rules(""), client(tls="TLSv1.3"), config())
    assert isinstance(tls, Reject) and tls.message.endswith(", SSL encryption")
    local = decide(rules(""), client(address="unix"), config())
    assert isinstance(local, Reject) and local.message.startswith('no pg_hba.conf entry for host "[local]"')


def test_first_matching_line_decides() -> None:
    lines = rules("host all u 127.0.0.1/32 reject\nhost all all all trust\n")
    answer = decide(lines, client(), config())
    assert isinstance(answer, Reject)
    assert (
        answer.message
        == 'pg_hba.conf rejects connection for host "127.0.0.1", user "u", database "app", no encryption'
    )
    assert answer.reason == "hba: rejected by pg_hba.conf:1"
    assert decide(lines, client(user="other"), config()) == Trust(reason="hba: trust by pg_hba.conf:2")


@pytest.mark.parametrize(
    ("line", "who", "matches"),
    [
        ("local all all trust", client(address="unix"), True),
        ("local all all trust", client(), False),
        ("host all all all trust", client(address="unix"), False),
        ("hostssl all all all trust", client(tls="TLSv1.3"), True),
        ("hostssl all all all trust", client(), False),
        ("hostnossl all all all trust", client(), True),
        ("hostnossl all all all trust", client(tls="TLSv1.2"), False),
        ("host app,other u all trust", client(), True),
        ("host other u all trust", client(), False),
        ("host sameuser all all trust", client(user="app"), True),
        ("host sameuser all all trust", client(), False),
        ("host all v,u all trust", client(), True),
        ("host all 127.0.0.1/32 trust", client(), False),  # (user "127.0.0.1/32", then address "trust")
        ("host all all 127.0.0.1/32 trust", client(address="127.0.0.2:4000"), False),
        ("host all all 127.0.0.0/8 trust", client(address="127.0.0.2:4000"), True),
        ("host all all 127.0.0.0 255.0.0.0 trust", client(address="127.0.0.2:4000"), True),
        ("host all all ::1/128 trust", client(address="::1:4000"), True),
        ("host all all ::1/128 trust", client(), False),
        ("host all all 0.0.0.0/0 trust", client(address="::1:4000"), False),
    ],
)
def test_what_a_line_matches(line: str, who: ClientInfo, matches: bool) -> None:
    try:
        lines = rules(line + "\n")
    except HbaError:
        assert not matches
        return
    assert isinstance(decide(lines, who, config()), Trust) is matches


def test_password_lines_leave_the_exchange_to_the_users_secret() -> None:
    assert decide(rules("host all all all md5\n"), client(), config()) is None
    assert decide(rules("host all all all scram-sha-256\n"), client(), config()) is None
    # PostgreSQL cannot run SCRAM against an md5 hash either: an exchange that fails with 28P01
    answer = decide(rules("host all all all scram-sha-256\n"), client(user="hashed"), config())
    assert isinstance(answer, ScramSha256) and answer.secret is None
    assert decide(rules("host all all all md5\n"), client(user="hashed"), config()) is None


def test_a_trust_user_has_no_password_to_give_on_a_password_line() -> None:
    # the rules decide how a client logs in: `auth: trust` in users: lets it in on a trust line only
    for method in ("md5", "scram-sha-256"):
        answer = decide(rules(f"host all all all {method}\n"), client(user="trusted"), config())
        assert isinstance(answer, ScramSha256) and answer.secret is None, answer
    assert isinstance(decide(rules("host all all all trust\n"), client(user="trusted"), config()), Trust)


def test_cert_lines_ask_the_core_for_the_certificate() -> None:
    answer = decide(rules("hostssl all all all cert\n"), client(tls="TLSv1.3"), config())
    assert answer == Cert(reason="hba: cert by pg_hba.conf:1")


def test_peer_lines_ask_the_core_for_the_os_user_with_their_map() -> None:
    local = client(address="unix")
    staff = UserMap("staff", (UserMapLine("alice", "u"),))
    lines = rules("local all all peer map=staff\nlocal all all peer map=gone\nlocal all all peer\n")
    assert decide(lines, local, config(), maps={"staff": staff}) == Peer(
        staff, reason="hba: peer by pg_hba.conf:1"
    )
    # a map the ident file lacks lets no one in
    assert decide(lines[1:], local, config(), maps={}) == Peer(
        UserMap("gone"), reason="hba: peer by pg_hba.conf:2"
    )
    assert decide(lines[2:], local, config()) == Peer(reason="hba: peer by pg_hba.conf:3")
    assert isinstance(decide(lines, client(), config()), Reject)  # TCP: no local line matches


# --- loading -----------------------------------------------------------------------------------------


def test_no_file_decides_nothing() -> None:
    hba.halephant_configure(config=config())
    assert hba.halephant_authenticate(client=client(), config=config()) is None


def test_the_file_is_read_at_load_and_its_rules_used(tmp_path: Path) -> None:
    path = tmp_path / "pg_hba.conf"
    path.write_text("host app u 127.0.0.1/32 trust\n")
    loaded = config(hba_file=path)
    hba.halephant_configure(config=loaded)
    assert isinstance(hba.halephant_authenticate(client=client(), config=loaded), Trust)
    # the rules are those read at load: a later edit counts from the next load (reload) on
    path.write_text("host app u 127.0.0.1/32 reject\n")
    assert isinstance(hba.halephant_authenticate(client=client(), config=loaded), Trust)
    reloaded = config(hba_file=path)
    hba.halephant_configure(config=reloaded)
    assert isinstance(hba.halephant_authenticate(client=client(), config=reloaded), Reject)


def test_a_bad_file_refuses_the_config_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pg_hba.conf"
    path.write_text("local all all trust\nhost all all all password\nhost all all\n")
    with pytest.raises(ConfigError) as caught:
        config(hba_file=path)
    text = str(caught.value)
    assert f"plugins.hba.file: {path}:2: method 'password' (cleartext) is not supported" in text, text
    assert f"{path}:3: end-of-line before IP address specification" in text, text


def test_a_missing_file_or_relative_path_refuses_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.hba\.file: cannot read .*nowhere: No such file"):
        config(hba_file=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"plugins\.hba\.file: must be an absolute path"):
        validate_config(
            read_config_text(BASE + USERS + "plugins: {hba: {file: pg_hba.conf}}\n", "halephant.yaml"),
            {"hba": HbaSettings},
        )


def test_the_ident_file_is_read_at_load_and_its_maps_used(tmp_path: Path) -> None:
    hba_file, ident_file = tmp_path / "pg_hba.conf", tmp_path / "pg_ident.conf"
    hba_file.write_text("local all all peer map=staff\n")
    ident_file.write_text("staff alice u\n")
    loaded = config(hba_file=hba_file, ident_file=ident_file)
    hba.halephant_configure(config=loaded)
    answer = hba.halephant_authenticate(client=client(address="unix"), config=loaded)
    assert answer == Peer(UserMap("staff", (UserMapLine("alice", "u"),)), reason=f"hba: peer by {hba_file}:1")


def test_a_bad_ident_file_or_a_map_without_one_refuses_the_config(tmp_path: Path) -> None:
    hba_file, ident_file = tmp_path / "pg_hba.conf", tmp_path / "pg_ident.conf"
    hba_file.write_text("local all all trust\nlocal all all peer map=staff\n")
    ident_file.write_text("staff alice\nstaff /( u\n")
    with pytest.raises(ConfigError) as caught:
        config(hba_file=hba_file, ident_file=ident_file)
    text = str(caught.value)
    assert f"plugins.hba.ident_file: {ident_file}:1: missing entry at end of line" in text, text
    assert f"{ident_file}:2: invalid regular expression" in text, text
    with pytest.raises(ConfigError) as caught:
        config(hba_file=hba_file)
    assert f"plugins.hba: {hba_file}:2: map 'staff' needs plugins.hba.ident_file" in str(caught.value)
    with pytest.raises(ConfigError, match=r"plugins\.hba\.ident_file: cannot read .*nowhere: No such file"):
        config(hba_file=hba_file, ident_file=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"plugins\.hba\.ident_file: must be an absolute path"):
        validate_config(
            read_config_text(
                BASE + USERS + f"plugins: {{hba: {{file: {hba_file}, ident_file: pg_ident.conf}}}}\n",
                "halephant.yaml",
            ),
            {"hba": HbaSettings},
        )


def test_a_map_the_ident_file_lacks_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hba_file, ident_file = tmp_path / "pg_hba.conf", tmp_path / "pg_ident.conf"
    hba_file.write_text("local all all peer map=staff\nlocal all all peer map=gone\n")
    ident_file.write_text("staff alice u\n")
    with caplog.at_level(logging.WARNING, logger="halephant.plugins.hba"):
        hba.halephant_configure(config=config(hba_file=hba_file, ident_file=ident_file))
    assert (
        f"{hba_file}:2: map 'gone' is not in {ident_file}: the line can never let a client in" in caplog.text
    )
    assert "'staff'" not in caplog.text


def test_cert_lines_without_client_certificates_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pg_hba.conf"
    path.write_text("local all all trust\nhostssl all all all cert\n")
    with caplog.at_level(logging.WARNING, logger="halephant.plugins.hba"):
        hba.halephant_configure(config=config(hba_file=path))
    assert f"{path}: cert on line 2 can never let a client in: client_tls.mode is disable" in caplog.text


def test_the_example_file_parses_and_halephant_yaml_documents_the_section() -> None:
    root = Path(__file__).resolve().parents[2]
    example = root / "examples" / "pg_hba.conf"
    methods = {rule.method for rule in parse_hba(example.read_text(), str(example))}
    assert methods == {"trust", "scram-sha-256", "reject", "cert", "peer"}
    ident = root / "examples" / "pg_ident.conf"
    ops = parse_ident(ident.read_text(), str(ident))["ops"]
    assert ops.allows("alice", "admin") and ops.allows("myapp-ro", "myapp_ro") and ops.allows("deploy", "x")
    assert not ops.allows("alice", "myapp_ro")
    text = (root / "halephant.yaml").read_text().replace("#", "")
    assert "hba:" in text and "file: /etc/halephant/pg_hba.conf" in text
    assert "ident_file: /etc/halephant/pg_ident.conf" in text
