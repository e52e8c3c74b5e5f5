"""`client_tls:`: what each mode needs, the files read and checked when the configuration is loaded
(`halephant check`, start-up, reload), each problem at its key's file:line:col, and the context built."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from support.config_text import load, problems

from halephant.config.client_tls import channel_binding, fingerprint
from halephant.tls_files import end_point_hash

BASE = """\
clusters:
  main:
    nodes: [127.0.0.1:5432]
databases:
  myapp: {cluster: main}
users:
  myapp: {password: secret}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tls-files")
    ca = trustme.CA()
    leaf, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    paths = {name: root / f"{name}.pem" for name in ("ca", "cert", "key", "other_key", "both", "junk", "enc")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["both"].write_bytes(leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes())
    paths["junk"].write_text("not PEM at all\n")
    for name in ("key", "other_key", "both", "junk"):
        paths[name].chmod(0o600)  # a private key others may read is refused (see the test)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    paths["enc"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    paths["enc"].chmod(0o600)
    return paths


def section(**keys: object) -> str:
    return "client_tls:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items())


def test_off_by_default() -> None:
    config = load(BASE)
    assert config.client_tls.mode == "disable"
    assert config.client_tls_context is None and config.client_tls_certificate is None


@pytest.mark.parametrize(
    ("mode", "verify_mode"),
    [
        ("allow", ssl.CERT_NONE),
        ("prefer", ssl.CERT_NONE),
        ("require", ssl.CERT_NONE),
        ("verify-ca", ssl.CERT_OPTIONAL),
        ("verify-full", ssl.CERT_OPTIONAL),
    ],
)
def test_the_context_is_built_when_the_configuration_is_loaded(
    files: dict[str, Path], mode: str, verify_mode: ssl.VerifyMode
) -> None:
    config = load(
        BASE + section(mode=mode, cert_file=files["cert"], key_file=files["key"], ca_file=files["ca"])
    )
    context = config.client_tls_context
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == verify_mode
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    expected = fingerprint(ssl.PEM_cert_to_DER_cert(files["cert"].read_text()))
    assert config.client_tls_certificate == expected
    assert len(expected) == 32 * 3 - 1 and expected == expected.upper()


def test_min_version_and_one_file_for_both(files: dict[str, Path]) -> None:
    config = load(
        BASE + section(mode="require", cert_file=files["both"], key_file=files["both"], min_version="TLSv1.3")
    )
    assert config.client_tls_context is not None
    assert config.client_tls_context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_ciphers_restrict_the_context_and_a_list_that_selects_none_is_refused(
    files: dict[str, Path],
) -> None:
    keys = {"mode": "require", "cert_file": files["cert"], "key_file": files["key"]}
    config = load(BASE + section(**keys, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
    context = config.client_tls_context
    assert context is not None
    assert [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"] == [
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    ]
    assert problems(BASE + section(**keys, ciphers="NO-SUCH-CIPHER")) == [
        "halephant.yaml:12:12: client_tls.ciphers: no cipher matches 'NO-SUCH-CIPHER': give an OpenSSL "
        "cipher list (`openssl ciphers -v LIST` shows what one selects), e.g. HIGH:!aNULL"
    ]


def test_disable_with_files_checks_them_and_answers_no_ssl_request(files: dict[str, Path]) -> None:
    # files may be put in place before TLS is turned on (by a reload): they are checked already
    config = load(BASE + section(mode="disable", cert_file=files["cert"], key_file=files["key"]))
    assert config.client_tls_context is None
    assert config.client_tls_certificate is not None
    assert problems(BASE + section(mode="disable", cert_file=files["junk"], key_file=files["key"])) == [
        f"halephant.yaml:10:14: client_tls.cert_file: {files['junk']} holds no PEM certificate "
        "(-----BEGIN CERTIFICATE-----)"
    ]


def test_relative_paths_are_refused_as_for_every_file_halephant_yaml_names() -> None:
    # relative to what? The directory halephant was started from need not be a reload's
    assert problems(BASE + section(mode="require", cert_file="tls/cert.pem", key_file="/k.pem")) == [
        "halephant.yaml:10:14: client_tls.cert_file: expected an absolute path (starting with /), like "
        "/etc/ssl/certs/pg.crt; got 'tls/cert.pem'"
    ]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"mode": "require"},
            [
                "halephant.yaml:9:9: client_tls.mode: require needs cert_file: the certificate halephant "
                "presents to clients (PEM)",
                "halephant.yaml:9:9: client_tls.mode: require needs key_file: its private key (PEM)",
            ],
        ),
        (
            {"mode": "verify-full", "cert_file": "/c.pem", "key_file": "/k.pem"},
            [
                "halephant.yaml:9:9: client_tls.mode: verify-full needs ca_file: the certificates that sign "
                "the clients' certificates (PEM)"
            ],
        ),
        (
            {"cert_file": "/c.pem"},
            ["halephant.yaml:9:14: client_tls.cert_file: cert_file needs key_file too"],
        ),
        (
            {"mode": "required"},
            [
                "halephant.yaml:9:9: client_tls.mode: Input should be 'disable', 'allow', 'prefer', "
                "'require', 'verify-ca' or 'verify-full'"
            ],
        ),
        (
            {"mode": "require", "cert_file": "/c.pem", "key_file": "/k.pem", "min_version": "TLSv1.1"},
            ["halephant.yaml:12:16: client_tls.min_version: Input should be 'TLSv1.2' or 'TLSv1.3'"],
        ),
        ({"cert": "/c.pem"}, ["halephant.yaml:9:3: client_tls.cert: unknown key; did you mean 'cert_file'?"]),
        (
            {"cert_file": "''", "key_file": "/k.pem"},
            ["halephant.yaml:9:14: client_tls.cert_file: String should have at least 1 character"],
        ),
    ],
)
def test_what_each_mode_needs_and_bad_values(keys: dict[str, str], expected: list[str]) -> None:
    # (checked before any file is read: none of these names exists)
    assert problems(BASE + section(**keys)) == expected


def test_files_that_cannot_be_used_are_reported_at_their_key(files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    cases = [
        (
            {"cert_file": missing, "key_file": files["key"]},
            f"10:14: client_tls.cert_file: cannot read {missing}",
        ),
        (
            {"cert_file": tmp_path, "key_file": files["key"]},
            f"10:14: client_tls.cert_file: cannot read {tmp_path}",
        ),
        ({"cert_file": files["key"], "key_file": files["key"]}, "10:14: client_tls.cert_file: "),
        (
            {"cert_file": files["cert"], "key_file": missing},
            f"11:13: client_tls.key_file: cannot read {missing}",
        ),
        ({"cert_file": files["cert"], "key_file": files["junk"]}, "11:13: client_tls.key_file: "),
        (
            {"cert_file": files["cert"], "key_file": files["other_key"]},
            f"11:13: client_tls.key_file: {files['other_key']} is not the private key of the certificate in "
            f"{files['cert']}",
        ),
        (
            {"cert_file": files["cert"], "key_file": files["enc"]},
            f"11:13: client_tls.key_file: {files['enc']} is encrypted with a passphrase",
        ),
        (
            {"cert_file": files["cert"], "key_file": files["key"], "ca_file": files["junk"]},
            f"12:12: client_tls.ca_file: {files['junk']} holds no PEM certificate",
        ),
        (
            {"cert_file": files["cert"], "key_file": files["key"], "ca_file": missing},
            f"12:12: client_tls.ca_file: cannot read {missing}",
        ),
    ]
    for keys, expected in cases:
        found = problems(
            BASE + section(**{"mode": "verify-ca", **keys, "ca_file": keys.get("ca_file", files["ca"])})
        )
        assert len(found) == 1 and found[0].startswith(f"halephant.yaml:{expected}"), (keys, found)
    assert problems(BASE + section(mode="require", cert_file=files["junk"], key_file=files["key"])) == [
        f"halephant.yaml:10:14: client_tls.cert_file: {files['junk']} holds no PEM certificate "
        "(-----BEGIN CERTIFICATE-----)"
    ]
    assert problems(BASE + section(mode="require", cert_file=files["cert"], key_file=files["junk"])) == [
        f"halephant.yaml:11:13: client_tls.key_file: {files['junk']} holds no PEM private key"
    ]


def test_a_private_key_others_may_read_is_refused_as_postgresql_refuses_it(
    files: dict[str, Path], tmp_path: Path
) -> None:
    readable = tmp_path / "readable.key"
    readable.write_bytes(files["key"].read_bytes())
    readable.chmod(0o644)
    assert problems(BASE + section(mode="require", cert_file=files["cert"], key_file=readable)) == [
        f"halephant.yaml:11:13: client_tls.key_file: {readable} has group or world access (mode 0644): a "
        "private key must have mode 0600 or less, or 0640 or less if owned by root (chmod 0600 it), as libpq "
        "requires"
    ]


def test_every_problem_is_reported_at_once(files: dict[str, Path]) -> None:
    # a broken file is found alongside a mistake elsewhere in the file
    found = problems(
        BASE.replace("{cluster: main}", "{cluster: nope}")
        + section(mode="require", cert_file=files["junk"], key_file=files["key"])
    )
    assert [p.split(": ")[1] for p in found] == ["databases.myapp.cluster", "client_tls.cert_file"]


# --- tls-server-end-point: what SCRAM-SHA-256-PLUS binds a login to -----------------------------------------


def _self_signed(key: Any, algorithm: hashes.HashAlgorithm | None, pss: padding.PSS | None = None) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "halephant")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
    )
    certificate = builder.sign(key, algorithm, rsa_padding=pss) if pss else builder.sign(key, algorithm)
    return certificate.public_bytes(serialization.Encoding.DER)


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())


@pytest.mark.parametrize(
    ("key", "algorithm", "pss", "expected"),
    [
        (RSA_KEY, hashes.SHA256(), None, "sha256"),
        (RSA_KEY, hashes.SHA384(), None, "sha384"),
        (RSA_KEY, hashes.SHA512(), None, "sha512"),
        (EC_KEY, hashes.SHA224(), None, "sha224"),
        (EC_KEY, hashes.SHA256(), None, "sha256"),
        (EC_KEY, hashes.SHA384(), None, "sha384"),
        (RSA_KEY, hashes.SHA384(), padding.PSS(padding.MGF1(hashes.SHA384()), 48), "sha384"),
        (RSA_KEY, hashes.SHA256(), padding.PSS(padding.MGF1(hashes.SHA256()), 32), "sha256"),
    ],
    ids=["rsa-256", "rsa-384", "rsa-512", "ecdsa-224", "ecdsa-256", "ecdsa-384", "pss-384", "pss-256"],
)
def test_end_point_hash_uses_the_signatures_hash(
    key: Any, algorithm: hashes.HashAlgorithm, pss: padding.PSS | None, expected: str
) -> None:
    der = _self_signed(key, algorithm, pss)
    assert end_point_hash(der) == hashlib.new(expected, der).digest()


def test_end_point_hash_of_a_signature_without_a_hash_is_none() -> None:
    # RFC 5929 defines none for Ed25519: SCRAM-SHA-256-PLUS is then not offered
    assert end_point_hash(_self_signed(ed25519.Ed25519PrivateKey.generate(), None)) is None
    assert end_point_hash(b"\x30\x03") is None  # (cut short: not read past its end)


def test_each_loaded_context_carries_its_certificates_binding(files: dict[str, Path]) -> None:
    config = load(BASE + section(mode="require", cert_file=files["cert"], key_file=files["key"]))
    assert config.client_tls_context is not None
    der = ssl.PEM_cert_to_DER_cert(files["cert"].read_text())
    assert (
        channel_binding(config.client_tls_context) == hashlib.sha256(der).digest()
    )  # (trustme: ECDSA-SHA256)
    assert channel_binding(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) is None
