"""`clusters.<name>.tls`: TLS from halephant to the nodes, as libpq's sslmode. Each cluster's SSL context
is made once per load, with its files; a mode that lacks a file, a file that does not load and a
setting that would be ignored are errors at the setting to blame, as `halephant check` prints them."""

from __future__ import annotations

import os
import pathlib
import ssl

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from support.config_text import load, problems

from halephant.config.diff import diff_configs


def _config(tls: str, other: str = "") -> str:
    """A configuration whose cluster `main` has `tls` (YAML lines indented under `tls:`)."""
    return (
        "clusters:\n"
        "  main:\n"
        "    nodes: [127.0.0.1:5432]\n"
        "    tls:\n" + "".join(f"      {line}\n" for line in tls.splitlines()) + other + "databases:\n"
        "  myapp: {cluster: main}\n"
        "users:\n"
        "  myapp: {password: secret}\n"
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """CA, client certificate and key, and broken variants, by name -> path."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.crt")
    client = ca.issue_cert("app", common_name="app")
    client.cert_chain_pems[0].write_to_path(d / "client.crt")
    client.private_key_pem.write_to_path(d / "client.key")
    ca.issue_cert("other").private_key_pem.write_to_path(d / "other.key")
    (d / "junk.pem").write_text("not a certificate\n")
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (d / "encrypted.key").write_bytes(encrypted)
    (d / "readable.key").write_bytes(client.private_key_pem.bytes())
    for name in ("client.key", "other.key", "encrypted.key", "junk.pem"):
        (d / name).chmod(0o600)
    (d / "readable.key").chmod(0o644)
    return {path.name: str(path) for path in d.iterdir()}


def test_the_default_is_prefer_unverified_and_made_once_per_load() -> None:
    text = "clusters:\n  main:\n    nodes: [127.0.0.1:5432]\ndatabases:\n  myapp: {cluster: main}\n"
    text += "users:\n  myapp: {password: secret}\n"
    config = load(text)
    tls = config.server_tls("main")
    assert (tls.mode, tls.required) == ("prefer", False)
    assert tls.context is not None
    assert (tls.context.check_hostname, tls.context.verify_mode) == (False, ssl.CERT_NONE)
    assert tls.context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert config.server_tls("main") is tls  # made by the load, not per connection
    again = load(text).server_tls("main")
    assert again is not tls and again.context is not tls.context  # a reload reads the files again
    assert again.settings == tls.settings


def test_each_mode_makes_its_context(files: dict[str, str]) -> None:
    assert load(_config("mode: disable")).server_tls("main").context is None
    require = load(_config("mode: require\nmin_version: TLSv1.3")).server_tls("main")
    assert require.required and require.context is not None
    assert (require.context.verify_mode, require.context.check_hostname) == (ssl.CERT_NONE, False)
    assert require.context.minimum_version is ssl.TLSVersion.TLSv1_3
    ca = load(_config(f"mode: verify-ca\nca_file: {files['ca.crt']}")).server_tls("main").context
    assert ca is not None and (ca.verify_mode, ca.check_hostname) == (ssl.CERT_REQUIRED, False)
    assert len(ca.get_ca_certs()) == 1
    full = load(_config(f"mode: verify-full\nca_file: {files['ca.crt']}")).server_tls("main").context
    assert full is not None and (full.verify_mode, full.check_hostname) == (ssl.CERT_REQUIRED, True)
    system = load(_config("mode: verify-full\nca_file: system")).server_tls("main").context
    assert system is not None and system.check_hostname
    with_cert = _config(f"mode: require\ncert_file: {files['client.crt']}\nkey_file: {files['client.key']}")
    assert load(with_cert).server_tls("main").context is not None


def test_clusters_have_their_own_settings(files: dict[str, str]) -> None:
    config = load(
        "clusters:\n"
        "  main:\n    nodes: [127.0.0.1:5432]\n    tls: {mode: require}\n"
        "  other:\n    nodes: [127.0.0.1:5433]\n"
        "databases:\n  myapp: {cluster: main}\nusers:\n  myapp: {password: secret}\n"
    )
    assert [config.server_tls(name).mode for name in ("main", "other")] == ["require", "prefer"]


# (the YAML lines under tls:, the line:col of the problem and its key under tls:, a part of its message)
BROKEN = [
    ("mode: verify-ca", "5:13 mode", "verify-ca checks the server's certificate against ca_file"),
    ("mode: verify-full", "5:13 mode", "set ca_file to the CA certificate(s)"),
    ("mode: sometimes", "5:13 mode", "'disable', 'prefer', 'require', 'verify-ca' or"),
    ("mode: require\nca_file: {ca.crt}", "6:16 ca_file", "set mode to verify-ca or verify-full"),
    ("ca_file: {ca.crt}", "5:16 ca_file", "with mode prefer the server's certificate is not"),
    ("mode: verify-ca\nca_file: system", "6:16 ca_file", "system needs mode verify-full"),
    ("mode: verify-ca\nca_file: ca.crt", "6:16 ca_file", "expected an absolute path"),
    ("mode: verify-ca\nca_file: /no/such.crt", "6:16 ca_file", "cannot read /no/such.crt: No such file"),
    ("mode: verify-ca\nca_file: {junk.pem}", "6:16 ca_file", "holds no PEM certificate"),
    ("cert_file: {client.crt}", "5:18 cert_file", "cert_file needs key_file too"),
    ("key_file: {client.key}", "5:17 key_file", "key_file needs cert_file too"),
    ("cert_file: {junk.pem}\nkey_file: {client.key}", "5:18 cert_file", "holds no PEM certificate"),
    ("cert_file: {client.crt}\nkey_file: {other.key}", "6:17 key_file", "is not the private key of"),
    ("cert_file: {client.crt}\nkey_file: {junk.pem}", "6:17 key_file", "holds no PEM private key"),
    ("cert_file: {client.crt}\nkey_file: {encrypted.key}", "6:17 key_file", "encrypted with a passphrase"),
    ("cert_file: {client.crt}\nkey_file: {readable.key}", "6:17 key_file", "(mode 0644): a private key must"),
    ("cert_file: {client.crt}\nkey_file: /no/such.key", "6:17 key_file", "cannot read /no/such.key"),
    (
        "mode: disable\ncert_file: {client.crt}\nkey_file: {client.key}",
        "6:18 cert_file",
        "mode is disable (no TLS), so cert_file is never used",
    ),
    ("min_version: TLSv1.1", "5:20 min_version", "'TLSv1.2' or 'TLSv1.3'"),
    ("ciphers: NO-SUCH-CIPHER", "5:16 ciphers", "no cipher matches 'NO-SUCH-CIPHER': give an OpenSSL"),
    ("ciphers: ''", "5:16 ciphers", "at least 1 character"),
    ("mode: disable\nciphers: HIGH", "6:16 ciphers", "mode is disable (no TLS), so ciphers is never used"),
    ("minversion: TLSv1.3", "5:7 minversion", "unknown key; did you mean 'min_version'?"),
    ("ca_file: 5", "5:16 ca_file", "expected a string, got a number"),
]


@pytest.mark.parametrize(("tls", "where", "message"), BROKEN)
def test_a_broken_setting_is_reported_where_it_is_written(
    files: dict[str, str], tls: str, where: str, message: str
) -> None:
    text = tls
    for name, path in files.items():
        text = text.replace("{" + name + "}", path)
    found = problems(_config(text))
    position, key = where.split()
    assert len(found) == 1, found
    assert found[0].startswith(f"halephant.yaml:{position}: clusters.main.tls.{key}: "), found
    assert message in found[0], found


def test_ciphers_restrict_the_context() -> None:
    config = load(_config("ciphers: ECDHE-RSA-AES128-GCM-SHA256"))
    context = config.server_tls("main").context
    assert context is not None
    tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == ["ECDHE-RSA-AES128-GCM-SHA256"]


def test_every_problem_is_reported_at_once(files: dict[str, str]) -> None:
    # a TLS file that does not load is found though another part of the file is wrong as well
    found = problems(
        _config("mode: verify-ca\nca_file: /no/such.crt", other="limits: {max_client_conn: '9'}\n")
    )
    assert [line.split(": ", 2)[1] for line in found] == [
        "clusters.main.tls.ca_file",
        "limits.max_client_conn",
    ]


def test_a_key_owned_by_root_may_be_read_by_its_group(files: dict[str, str], tmp_path: pathlib.Path) -> None:
    # libpq's rule: 0640 for a key owned by root (a group the server runs in), 0600 for one's own
    if os.geteuid() != 0:
        pytest.skip("needs root: the key must be owned by root")
    key = tmp_path / "group.key"
    key.write_bytes(pathlib.Path(files["client.key"]).read_bytes())
    key.chmod(0o640)
    assert load(_config(f"cert_file: {files['client.crt']}\nkey_file: {key}")).server_tls("main").context


def test_a_change_shows_in_a_reload_diff(files: dict[str, str]) -> None:
    old = load(_config("mode: prefer"))
    new = load(_config(f"mode: verify-full\nca_file: {files['ca.crt']}"))
    changes = [str(change) for change in diff_configs(old, new)]
    assert changes == [
        "~ clusters.main.tls.mode: prefer -> verify-full",
        f"~ clusters.main.tls.ca_file: null -> {files['ca.crt']}",
    ]
