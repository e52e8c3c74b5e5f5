"""The `halephant status` renderer, driven with rich's recording console at 80 and 160 columns, and the
`halephant_extend_status` hook as the view calls it (no halephant running: a snapshot is plain data)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rich.console import Console

from halephant import hookimpl
from halephant.plugin_manager import Plugins
from halephant.status import render
from halephant.types import StatusPanel

NOW = time.time()


def snapshot() -> dict[str, Any]:
    pool = {
        "database": "myapp", "user": "myapp", "node": "10.0.0.1:5432", "pool_mode": "transaction",
        "cl_active": 42, "cl_waiting": 3, "sv_active": 20, "sv_idle": 0, "sv_used": 1, "sv_login": 0,
        "maxwait": 1.25, "transactions": 123456, "queries": 234567, "checkout_timeouts": 2, "paused": False,
    }  # fmt: skip
    replica_pool = {**pool, "user": "myapp_ro", "node": "10.0.0.2:5432", "cl_waiting": 0, "maxwait": 0.0}
    return {
        "summary": {
            "version": "0.1.0",
            "pid": 4242,
            "now": NOW,
            "uptime": 3723.0,
            "listen": "127.0.0.1:6432",
            "transactions_per_s": 1520.5,
            "queries_per_s": 3044.0,
            "clients_tls": 17,
            "paused": [],
        },
        "pools": [pool, replica_pool],
        "nodes": [
            {
                "cluster": "main",
                "name": "10.0.0.1:5432",
                "role": "primary",
                "usable": True,
                "lag_bytes": None,
                "lag_seconds": None,
                "last_probe": NOW - 0.5,
                "reason": "",
            },
            {
                "cluster": "main",
                "name": "10.0.0.2:5432",
                "role": "replica",
                "usable": False,
                "lag_bytes": 5 * 1024 * 1024,
                "lag_seconds": 12.5,
                "last_probe": NOW - 1.0,
                "reason": "lag above max_lag",
            },
        ],
        "clients_by_state": {"login": 0, "idle": 39, "waiting": 3, "active": 20},
        "queues": [
            {
                "database": "myapp",
                "user": "myapp",
                "node": "10.0.0.1:5432",
                "waiting": 3,
                "oldest_wait": 1.25,
                "clients": [7, 8, 9],
                "reason": "pool full",
            },
        ],
        "decisions": [
            {
                "at": NOW,
                "kind": "route_reject",
                "client": 17,
                "user": "myapp_ro",
                "database": "myapp",
                "sqlstate": "25006",
                "reason": "replica_routing: write on the read-only route (INSERT)",
            },
            {
                "at": NOW,
                "kind": "pin",
                "client": 12,
                "user": "myapp",
                "database": "myapp",
                "sqlstate": "",
                "reason": "SET",
            },
        ],
        "errors": {"25006": 4, "53300": 2},
    }


def recorded(width: int, **kwargs: Any) -> str:
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(render(snapshot(), width, **kwargs))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 160])
def test_every_panel_fits_the_width(width: int) -> None:
    text = recorded(width)
    assert max(len(line) for line in text.splitlines()) <= width
    for title in ("Pools", "Nodes", "Clients", "Errors sent", "Wait queues", "Recent decisions"):
        assert title in text, title
    assert "1,520.5 tx/s" in text and "3,044.0 q/s" in text
    assert "waiting 3" in text
    if width >= 100:
        assert "login 0  tls 17" in text  # the clients over TLS (cut off at 80 columns)
    assert "primary" in text and "replica" in text
    assert "5.0MB" in text and "12.5s" in text  # replica lag
    assert "25006" in text and "read_only_sql_transac" in text  # ellipsized at 80 columns
    assert "route_reject" in text
    assert "1.2s" in text  # the oldest waiter (1.25 s)


def test_wide_shows_every_pool_column_and_narrow_the_essential_ones() -> None:
    wide = recorded(160)
    for column in ("database", "user", "node", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
                   "maxwait", "timeouts"):  # fmt: skip
        assert column in wide, column
    assert "10.0.0.1:5432" in wide
    narrow = recorded(80)
    for column in ("cl_act", "cl_wait", "sv_act", "sv_idle", "sv_used", "maxwait"):
        assert column in narrow, column
    assert "myapp/myapp@5432" in narrow


def test_empty_snapshot_renders() -> None:
    console = Console(record=True, width=80, color_system=None)
    console.print(render({}, 80, error="cannot read http://127.0.0.1:1/snapshot: refused (retrying)"))
    text = console.export_text()
    assert "(no pools yet)" in text and "retrying" in text


class PanelPlugin:
    @hookimpl
    def halephant_extend_status(self, snapshot: dict[str, Any]) -> list[StatusPanel]:
        n = len(snapshot["pools"])
        return [StatusPanel("From a plugin", ("pools",), ((str(n),),), note="counted by a plugin")]


class BrokenPlugin:
    @hookimpl
    def halephant_extend_status(self) -> StatusPanel:
        raise RuntimeError("boom")


@pytest.mark.parametrize("width", [80, 160])
def test_plugins_add_panels_and_a_broken_one_is_shown_not_fatal(width: int) -> None:
    plugins = Plugins(extra=[(PanelPlugin(), "panel_plugin"), (BrokenPlugin(), "broken_plugin")])
    panels = plugins.status_panels(snapshot())
    assert [name for name, _ in panels] == ["panel_plugin", "broken_plugin"]
    text = recorded(width, panels=panels)
    assert "From a plugin" in text and "counted by a plugin" in text
    assert "broken_plugin: error" in text and "boom" in text
    assert max(len(line) for line in text.splitlines()) <= width


@pytest.mark.parametrize("width", [80, 160])
def test_names_are_shown_as_written_never_read_as_markup(width: int) -> None:
    # database and user names are the clients' own: `[/oops]` once made rich raise MarkupError
    data = snapshot()
    data["pools"][0]["database"] = "[/oops]"
    data["pools"][1]["user"] = "[bold]x"
    data["decisions"][0]["reason"] = "no databases entry named '[/oops]'"
    data["queues"][0]["reason"] = "[red]"
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(render(data, width, panels=[("[/p]", StatusPanel("[/t]", ("[c]",), (("[/v]",),)))]))
    text = console.export_text()
    for literal in ("[/oops]", "[bold]x", "[/t]", "[/v]"):
        assert literal in text, literal


def test_control_characters_in_names_are_shown_as_escapes() -> None:
    # a database reached through the '*' catch-all may be named with an escape sequence in it
    data = snapshot()
    data["pools"][0]["database"] = "x\x1b]0;pwned\x07\x1b[2J"
    console = Console(record=True, width=160, color_system=None, force_terminal=False)
    console.print(render(data, 160))
    text = console.export_text()
    assert "\x1b" not in text and "x\\x1b]0;pwned" in text


@pytest.mark.parametrize("width", [80, 120, 160])
def test_a_long_health_reason_leaves_the_node_and_role_whole(width: int) -> None:
    data = snapshot()
    data["nodes"][1]["reason"] = "127.0.0.1:5433 is down: could not connect: All connection attempts failed"
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(render(data, width))
    text = console.export_text()
    assert "10.0.0.2:5432" in text and "replica" in text and "primary" in text
    assert max(len(line) for line in text.splitlines()) <= width
