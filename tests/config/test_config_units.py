"""Durations, sizes and host:port addresses as written in halephant.yaml."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from halephant.config import HostPort, parse_duration, parse_size

DURATION_HELP = "expected a duration like 500ms, 30s, 5m, 1h, 1d or a number of seconds; got "
SIZE_HELP = "expected a size like 512kB, 64MB, 1GB or a whole number of bytes; got "


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        ("0s", 0.0),
        ("45", 45.0),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", DURATION_HELP + "'abc'"),
        ("5 minutes", DURATION_HELP + "'5 minutes'"),
        ("5M", DURATION_HELP + "'5M'"),
        ("-5s", DURATION_HELP + "'-5s'"),
        ("", DURATION_HELP + "''"),
        (True, DURATION_HELP + "True"),
        (None, DURATION_HELP + "nothing"),
        ([1], DURATION_HELP + "a list"),
        (-1, "a duration must be a finite number of seconds, 0 or more; got -1"),
        (float("inf"), "a duration must be a finite number of seconds, 0 or more; got inf"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_duration(value)
    assert str(excinfo.value) == message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MB", 64 * 1024 * 1024),
        ("512kB", 512 * 1024),
        ("512KB", 512 * 1024),
        ("1GB", 1024**3),
        ("2GiB", 2 * 1024**3),
        ("1TB", 1024**4),
        ("100B", 100),
        ("100", 100),
        (" 8 MB ", 8 * 1024 * 1024),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("64 megabytes", SIZE_HELP + "'64 megabytes'"),
        ("1.5GB", SIZE_HELP + "'1.5GB'"),
        ("MB", SIZE_HELP + "'MB'"),
        (1.5, SIZE_HELP + "1.5"),
        (False, SIZE_HELP + "False"),
        (-1, "a size cannot be negative; got -1"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_size(value)
    assert str(excinfo.value) == message


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:5432", "127.0.0.1", 5432, "127.0.0.1:5432"),
        ("localhost:6432", "localhost", 6432, "localhost:6432"),
        ("db-1.example.com:5432", "db-1.example.com", 5432, "db-1.example.com:5432"),
        ("[::1]:6432", "::1", 6432, "[::1]:6432"),
        ("[fe80::1%eth0]:5432", "fe80::1%eth0", 5432, "[fe80::1%eth0]:5432"),
        ("127.0.0.1:0", "127.0.0.1", 0, "127.0.0.1:0"),
    ],
)
def test_host_port(text: str, host: str, port: int, shown: str) -> None:
    address = HostPort.parse(text)
    assert (address.host, address.port, str(address)) == (host, port, shown)
    assert HostPort(host=host, port=port) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "expected host:port like 127.0.0.1:5432 or [::1]:5432; got '127.0.0.1'"),
        (":5432", "expected host:port like 127.0.0.1:5432 or [::1]:5432; got ':5432'"),
        ("::1:5432", "write an IPv6 address in brackets, like [::1]:5432; got '::1:5432'"),
        ("[::1]", "expected host:port like 127.0.0.1:5432 or [::1]:5432; got '[::1]'"),
        ("[nope]:5432", "not an IPv6 address in brackets: 'nope'"),
        ("[::zz]:5432", "not a valid host name or IP address: '::zz'"),
        ("localhost:http", "the port must be a number from 0 to 65535; got 'localhost:http'"),
        ("localhost:70000", "the port must be a number from 0 to 65535; got 'localhost:70000'"),
        ("bad host:5432", "not a valid host name or IP address: 'bad host'"),
    ],
)
def test_host_port_rejects(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        HostPort.parse(text)
    assert [e["msg"] for e in excinfo.value.errors()] == [message]
