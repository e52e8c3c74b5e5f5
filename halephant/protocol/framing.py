"""Framing of typed messages after login, in both directions, without copying payloads.

Theory of operation: a proxy must know message boundaries on both sides to pool safely (PgBouncer's
sbuf.c "looks at packet headers"), but must not pay for decoding what it only forwards. So:

* client -> server: `split_frames()` cuts a chunk into (type, start, end) triples and returns how many
  bytes it consumed; the caller keeps the incomplete tail and decodes only Query, Parse and the like.
* server -> client: `BackendScanner.feed()` walks a chunk header by header, counting ReadyForQuery and
  remembering the last transaction status; it copies out only the few message types a decision needs
  (ParameterStatus, ErrorResponse, ...), buffering one of those if it straddles two chunks.

Both raise `ProtocolViolation` on an impossible length and nothing else (`split_frames`: a
`MalformedMessage` that carries the complete messages before the bad one).
"""

from __future__ import annotations

import struct

from halephant.errors import MalformedMessage, ProtocolViolation
from halephant.protocol import codes

_LEN = struct.Struct("!i")
_unpack_len = _LEN.unpack_from
#: a message's type and length at once
_unpack_head = struct.Struct("!Bi").unpack_from
_READY_FOR_QUERY = codes.READY_FOR_QUERY
#: a whole ReadyForQuery's type and length: what nearly every reply ends with, before its status byte
READY_FOR_QUERY_HEAD = b"Z\0\0\0\x05"
#: ParseComplete then BindComplete: how a reply to an extended-protocol batch starts, passed in one step
_PARSE_BIND_COMPLETE = b"1\0\0\0\x042\0\0\0\x04"
#: `BackendScanner.kept` when a chunk held nothing to keep (never appended to: `_add_kept` replaces it)
_NOTHING_KEPT: list[tuple[int, bytes]] = []

Frame = tuple[int, int, int]

#: server messages a proxy passes on unchanged that may be large (a row, a row of COPY data, up to 1 GB):
#: a path that otherwise frames the server's messages whole passes one of these on as it comes
#: (through `BackendScanner`), so that it neither holds all of it nor copies it at every chunk
PASSED_AS_IT_COMES = frozenset((codes.DATA_ROW, codes.COPY_DATA))


def split_frames(data: bytes, max_size: int) -> tuple[list[Frame], int]:
    """Cut `data` into complete typed messages.

    Returns ``([(type, start, end), ...], consumed)`` where ``data[start:end]`` is the payload (after the
    5-byte header) and ``data[consumed:]`` is an incomplete message to keep for the next chunk.
    """
    n = len(data)
    if n >= 5:
        # the common case: exactly one message (a simple Query, a Sync)
        (length,) = _unpack_len(data, 1)
        if length + 1 == n and 4 <= length <= max_size:
            return [(data[0], 5, n)], n
    frames: list[Frame] = []
    append = frames.append
    pos = 0
    limit = n - 5
    while pos <= limit:
        t, length = _unpack_head(data, pos)
        end = pos + 1 + length
        if end > n or length < 4 or length > max_size:  # one test for the three rare cases
            if length < 4:
                raise MalformedMessage("invalid message length", data[:pos])
            if length > max_size:
                raise MalformedMessage(f"message too large ({length} bytes, limit {max_size})", data[:pos])
            break  # incomplete: the rest comes in a later chunk
        append((t, pos + 5, end))
        pos = end
    return frames, pos


def walk_types(data: bytes, pos: int, end: int, types: frozenset[int]) -> int:
    """Step over whole messages from `pos` while before `end`, each of a type in `types` with a valid
    length: the offset reached (`end` when the walk landed exactly on it), or -1 at a message of any
    other type. For a caller that has matched what ends `data` (a tail it knows) and must check that
    what comes before it is only those messages."""
    while pos < end:
        t, length = _unpack_head(data, pos)
        if length < 4 or t not in types:
            return -1
        pos += length + 1
    return pos


class BackendScanner:
    """Walks server->client bytes; counts ReadyForQuery and copies out the messages listed in `keep`.

    After `feed(chunk)`:
    * `ready` is how many ReadyForQuery messages the chunk completed, `status` the last one's status byte;
    * `at_boundary` is True when the chunk ended exactly at a message boundary;
    * `kept` lists (type, payload) for each complete message whose type is in `keep`.
    """

    __slots__ = (
        "_head",
        "_keep_buf",
        "_keep_len",
        "_keep_type",
        "_opening",
        "_skip",
        "_stop",
        "at_boundary",
        "keep",
        "kept",
        "ready",
        "status",
    )

    def __init__(self, keep: frozenset[int] = frozenset()) -> None:
        self.keep = keep
        self._stop = keep | {_READY_FOR_QUERY}  # the types the walk stops at
        #: passed in one step at a message boundary (the empty tuple matches nothing: kept types)
        self._opening: bytes | tuple[bytes, ...] = (
            () if keep & {codes.PARSE_COMPLETE, codes.BIND_COMPLETE} else _PARSE_BIND_COMPLETE
        )
        self._skip = 0  # bytes of the current (not kept) message still to come
        self._head = b""  # a header split across chunks
        self._keep_type = -1  # type of a kept message split across chunks
        self._keep_buf = bytearray()
        self._keep_len = 0
        self.ready = 0
        self.status = codes.TX_IDLE
        self.at_boundary = True
        self.kept: list[tuple[int, bytes]] = _NOTHING_KEPT

    def feed(self, data: bytes) -> int:
        """Walk `data`; returns `ready` (see the class)."""
        self.kept = _NOTHING_KEPT  # a list is made only when something is kept
        ready = 0
        pos = 0
        n = len(data)
        if not self.at_boundary:  # the previous chunk ended mid-message: _skip, _keep_type or _head
            self.ready = 0
            if self._skip:
                if self._skip >= n:
                    self._skip -= n
                    self.at_boundary = self._skip == 0
                    return 0
                pos = self._skip
                self._skip = 0
            elif self._keep_type >= 0:
                need = self._keep_need()
                take = min(need, n)
                self._keep_buf += data[:take]
                pos = take
                if take < need:
                    self.at_boundary = False
                    return 0
                self._finish_kept(self._keep_type, bytes(self._keep_buf))
                self._keep_type = -1
                self._keep_buf = bytearray()  # as large as that message (an error can be 1 GB): not kept
                ready = self.ready
            if self._head:
                data = self._head + data[pos:]
                self._head = b""
                pos = 0
                n = len(data)
        elif data.startswith(self._opening):  # the reply to nearly every extended-protocol batch
            pos = 10
        stop = self._stop
        unpack_head = _unpack_head  # a local: this loop runs for every server message
        if data[-6:-1] == READY_FOR_QUERY_HEAD:
            # Nearly every reply ends with its one ReadyForQuery: walk up to it without looking for
            # one on the way; the walk must then land exactly on it (a message reaching over it, or
            # one to stop at before it, leaves the rest of the chunk to the general walk below).
            end = n - 6
            while pos < end:
                t, length = unpack_head(data, pos)
                if length > 3 and t not in stop:
                    pos += length + 1
                    continue
                break
            if pos == end:
                ready += 1
                self.status = data[-1]
                self.ready = ready
                self.at_boundary = True
                return ready
        limit = n - 5
        # Written for the fewest bytecodes per message: this loop is most of the per-transaction cost
        # of the server->client direction. A passed-through message is not checked for being complete:
        # only the last one can run past the chunk, which the end of the walk sees (`pos > n`).
        while pos <= limit:
            t, length = unpack_head(data, pos)
            if length > 3 and t not in stop:
                pos += length + 1  # nearly every message: only passed through
                continue
            if t == _READY_FOR_QUERY and length == 5 and pos < limit:  # whole, as it nearly always is
                ready += 1
                self.status = data[pos + 5]
                pos += 6
                continue
            if length < 4:
                raise ProtocolViolation("server sent an invalid message length")
            if t == _READY_FOR_QUERY and length != 5:
                raise ProtocolViolation("server sent a ReadyForQuery of invalid length")
            end = pos + 1 + length
            if end > n:
                self.ready = ready
                self._start_kept(t, data, pos + 5, n, length)
                return ready
            if t == _READY_FOR_QUERY:
                ready += 1
                self.status = data[pos + 5]
            else:
                self._add_kept(t, data[pos + 5 : end])
            pos = end
        self.ready = ready
        if pos == n:
            self.at_boundary = True
        elif pos > n:  # the last message goes on in the next chunk
            self._skip = pos - n
            self.at_boundary = False
        else:
            self._head = data[pos:]
            self.at_boundary = False
        return ready

    def bytes_to_boundary(self) -> int:
        """How many bytes to feed next to make progress towards a message boundary (0: at one)."""
        if self._skip:
            return self._skip
        if self._keep_type >= 0:
            return self._keep_need()
        if self._head:
            return 5 - len(self._head)
        return 0

    def _start_kept(self, t: int, data: bytes, start: int, n: int, length: int) -> None:
        self._keep_type = t
        self._keep_buf = bytearray(data[start:n])
        self._keep_len = length - 4
        self.at_boundary = False

    def _keep_need(self) -> int:
        return self._keep_len - len(self._keep_buf)

    def _finish_kept(self, t: int, payload: bytes) -> None:
        if t == codes.READY_FOR_QUERY:
            self.ready += 1
            self.status = payload[0]
        else:
            self._add_kept(t, payload)

    def _add_kept(self, t: int, payload: bytes) -> None:
        if self.kept is _NOTHING_KEPT:
            self.kept = []
        self.kept.append((t, payload))
