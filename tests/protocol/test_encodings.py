"""PostgreSQL's client encodings as Python codecs, and a notification re-encoded for a client."""

from __future__ import annotations

import struct

import pytest

from halephant.protocol import messages as m
from halephant.protocol.encodings import codec_of, notification_for


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("UTF8", None),
        ("utf-8", None),
        ("SQL_ASCII", None),
        ("LATIN1", "iso8859-1"),
        ("latin9", "iso8859-15"),
        ("WIN1252", "cp1252"),
        ("SJIS", "cp932"),
        ("EUC_JP", "euc_jp"),
        ("KOI8R", "koi8-r"),
        ("no such encoding", None),
    ],
)
def test_codec_of(name: str, codec: str | None) -> None:
    assert codec_of(name) == codec


def test_notification_for_re_encodes_channel_and_payload() -> None:
    utf8 = m.message(b"A", struct.pack("!i", 42) + "café".encode() + b"\0" + "日本 é".encode() + b"\0")
    latin1 = notification_for(utf8, "iso8859-1")
    assert latin1 == m.message(b"A", struct.pack("!i", 42) + b"caf\xe9\0?? \xe9\0")
