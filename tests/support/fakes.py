"""Stand-ins for the I/O objects that unit tests of the proxy layer hand to its classes without sockets."""

from __future__ import annotations


class RecordingTransport:
    """A transport that keeps what is written to it, in order."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
