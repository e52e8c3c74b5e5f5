"""Stand-ins for the I/O objects that unit tests of the proxy layer hand to its classes without sockets."""

from __future__ import annotations


class RecordingTransport:
    """A transport that keeps what is written to it, in order."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class SendsDirectly:
    """For fake clients: `ClientConnection.send` writing at once, without holding the output to the end of
    the loop iteration (`halephant.proxy.output`), so that a test reads it from `transport.written`."""

    transport: RecordingTransport

    def send(self, data: bytes) -> None:
        self.transport.write(data)
