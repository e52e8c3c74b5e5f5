"""PostgreSQL's client encodings as Python codecs, for the messages halephant writes to a client in that
client's encoding itself instead of passing on bytes a server encoded for it.

Only one such message exists: a NotificationResponse the shared listener connection (UTF-8) received for
a transaction-mode client (`halephant.proxy.listener`), which PostgreSQL would have sent that client in its
own `client_encoding`.
"""

from __future__ import annotations

import codecs
import functools
import struct
from typing import Final

from halephant.protocol import messages as m

__all__ = ["codec_of", "notification_for"]

#: PostgreSQL's encoding names (as it reads them: lower case, letters and digits only) whose Python codec
#: has another name; every other name is tried as it is (latin1, koi8r, gbk, ...)
_CODECS: Final = {
    "latin2": "iso8859_2",
    "latin3": "iso8859_3",
    "latin4": "iso8859_4",
    "latin5": "iso8859_9",
    "latin6": "iso8859_10",
    "latin7": "iso8859_13",
    "latin8": "iso8859_14",
    "latin9": "iso8859_15",
    "latin10": "iso8859_16",
    "win": "cp1251",
    "alt": "cp866",
    "tcvn": "cp1258",
    "sjis": "cp932",
    "mskanji": "cp932",
    "shiftjis": "cp932",
    "shiftjis2004": "shift_jis_2004",
    "big5": "cp950",
    "uhc": "cp949",
    "euccn": "gb2312",
    "eucjis2004": "euc_jis_2004",
    "koi8": "koi8_r",
    "koi8r": "koi8_r",
    "koi8u": "koi8_u",
    "iso88595": "iso8859_5",
    "iso88596": "iso8859_6",
    "iso88597": "iso8859_7",
    "iso88598": "iso8859_8",
}
#: names under which PostgreSQL sends text as it has it (UTF-8 here): nothing to convert
_AS_IS: Final = frozenset(("utf8", "unicode", "sqlascii"))


@functools.lru_cache(maxsize=64)
def codec_of(client_encoding: str) -> str | None:
    """The Python codec for a `client_encoding` setting; None for UTF-8 (and SQL_ASCII, which PostgreSQL
    does not convert to) or an encoding Python does not know."""
    name = "".join(ch for ch in client_encoding.lower() if ch.isalnum())
    if name in _AS_IS:
        return None
    name = _CODECS.get(name, name)
    if name.startswith("win") and name[3:].isdigit():
        name = "cp" + name[3:]
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def notification_for(message: bytes, codec: str) -> bytes:
    """A NotificationResponse received in UTF-8, re-encoded in `codec` (what a character of that encoding
    cannot hold becomes "?")."""
    (pid,) = struct.unpack_from("!i", message, 5)
    channel_end = message.index(b"\0", 9)
    channel = message[9:channel_end].decode("utf-8", "replace").encode(codec, "replace")
    payload = message[channel_end + 1 : -1].decode("utf-8", "replace").encode(codec, "replace")
    return m.message(b"A", struct.pack("!i", pid) + channel + b"\0" + payload + b"\0")
