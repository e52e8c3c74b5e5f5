"""`halephant status`: a live terminal view of a running halephant, read from its admin API.

`fetch` reads `/snapshot`; `render` turns one snapshot (plus the panels plugins add through
`halephant_extend_status`) into rich renderables, laid out for the console's width: at 80 columns the
tables keep the columns an operator scans first, wider terminals get every column and side-by-side
panels. `watch` refreshes in place until `q` or Ctrl-C. The renderer is pure (snapshot in, renderables
out), which is what the tests drive with rich's recording console.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from halephant import sqlstate
from halephant.logs import printable
from halephant.types import StatusPanel

DEFAULT_URL = "http://127.0.0.1:6433"
#: below this width the compact layout is used
WIDE = 120
#: decisions shown
DECISIONS_SHOWN = 8

_SQLSTATE_NAMES = {
    value: name.lower() for name, value in vars(sqlstate).items() if name.isupper() and isinstance(value, str)
}

PanelSource = Callable[[dict[str, Any]], Sequence[tuple[str, StatusPanel | Exception]]]


class StatusError(Exception):
    """The admin API could not be read."""


def fetch(url: str, timeout: float = 3.0) -> dict[str, Any]:
    """GET `<url>/snapshot` and decode it."""
    target = url.rstrip("/") + "/snapshot"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StatusError(f"cannot read {target}: {reason}") from exc


# --- formatting helpers -------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def _count(n: float) -> str:
    if n >= 10_000_000:
        return f"{n / 1_000_000:.0f}M"
    if n >= 100_000:
        return f"{n / 1000:.0f}k"
    return f"{n:,.0f}" if isinstance(n, int) or n >= 100 else f"{n:.1f}"


class _DataTable(Table):
    """A table of what the admin API reports: names there are the clients' and plugins' own (a database
    named `[/x]`, or one with an escape sequence in it), so a plain string cell is text, never Rich
    markup, and its control characters are shown as escapes rather than sent to the terminal."""

    def add_row(self, *renderables: RenderableType | None, **kwargs: Any) -> None:
        super().add_row(*(Text(printable(r)) if isinstance(r, str) else r for r in renderables), **kwargs)


def _table(title: str, *, wide: bool) -> Table:
    return _DataTable(
        title=Text(title),
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 1) if wide else (0, 0, 0, 1),
        expand=False,
        show_edge=False,
        min_width=len(title) + 1,  # a title wider than the table would wrap
    )


# --- panels ---------------------------------------------------------------------------------------------


def header(snapshot: dict[str, Any]) -> Text:
    s = snapshot.get("summary", {})
    by_state = snapshot.get("clients_by_state", {})
    text = Text()
    text.append(f"halephant {s.get('version', '?')}", style="bold")
    listening = "  ".join(str(where) for where in (s.get("listen"), s.get("unix_socket")) if where)
    text.append(f"  pid {s.get('pid', '?')}  up {_duration(s.get('uptime'))}  {listening}\n")
    text.append(f"{s.get('transactions_per_s', 0):,.1f}", style="bold green")
    text.append(" tx/s  ")
    text.append(f"{s.get('queries_per_s', 0):,.1f}", style="bold green")
    text.append(" q/s  clients ")
    for state in ("active", "waiting", "idle", "login"):
        n = by_state.get(state, 0)
        style = "bold red" if state == "waiting" and n else ""
        text.append(f"{state} {n}", style=style)
        text.append("  ")
    if s.get("clients_tls"):
        text.append(f"tls {s['clients_tls']}  ")  # of those, over TLS (`client_tls:`)
    paused = s.get("paused") or []
    if paused:
        text.append("PAUSED: " + ", ".join(paused), style="bold yellow")
        text.append("  ")
    disabled = s.get("disabled") or []
    if disabled:
        text.append("DISABLED: " + ", ".join(disabled), style="bold yellow")
    return text


def pools_panel(snapshot: dict[str, Any], wide: bool) -> Table:
    t = _table("Pools", wide=wide)
    pools = snapshot.get("pools", [])
    numeric: tuple[str, ...]
    if wide:
        for name in ("database", "user", "node", "mode"):
            t.add_column(name, overflow="ellipsis", no_wrap=True, max_width=24)
        numeric = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login", "maxwait",
                   "tx", "queries", "timeouts")  # fmt: skip
    else:
        t.add_column("pool", overflow="ellipsis", no_wrap=True, max_width=30)
        numeric = ("cl_act", "cl_wait", "sv_act", "sv_idle", "sv_used", "maxwait", "tx")
    for name in numeric:
        t.add_column(name, justify="right", no_wrap=True)
    for p in pools:
        waiting = p.get("cl_waiting", 0)
        maxwait = _duration(p.get("maxwait")) if p.get("maxwait") else "0"
        cells: list[RenderableType] = [
            str(p.get("cl_active", 0)),
            Text(str(waiting), style="bold red" if waiting else ""),
            str(p.get("sv_active", 0)),
            str(p.get("sv_idle", 0)),
            str(p.get("sv_used", 0)),
        ]
        if wide:
            row: list[RenderableType] = [p["database"], p["user"], p["node"], p.get("pool_mode", "")]
            row += [*cells, str(p.get("sv_login", 0)), maxwait, _count(p.get("transactions", 0)),
                    _count(p.get("queries", 0)), str(p.get("checkout_timeouts", 0))]  # fmt: skip
        else:
            node = p["node"].rsplit(":", 1)[-1]  # the port tells the nodes of a test cluster apart
            row = [f"{p['database']}/{p['user']}@{node}", *cells, maxwait, _count(p.get("transactions", 0))]
        if p.get("paused"):
            row[0] = Text(f"{row[0]} (paused)", style="yellow")
        t.add_row(*row)
    if not pools:
        t.add_row(*(["(no pools yet)"] + [""] * (len(t.columns) - 1)))
    return t


def nodes_panel(snapshot: dict[str, Any], wide: bool) -> Table:
    t = _table("Nodes", wide=wide)
    nodes = snapshot.get("nodes", [])
    for name in ("cluster", "node", "role", "health", "lag", "lag_s", "probed"):
        if name == "cluster" and not wide:
            continue
        if name.startswith("lag"):
            t.add_column(name, no_wrap=True, overflow="ellipsis", justify="right")
        elif name == "node":  # the name whole: a long health reason gives way, not the node
            width = max((len(str(n.get("name", "?"))) for n in nodes), default=4)
            t.add_column(name, no_wrap=True, min_width=width)
        elif name == "role":
            t.add_column(name, no_wrap=True, min_width=7)
        elif name == "health":
            t.add_column(name, no_wrap=True, overflow="ellipsis", max_width=48 if wide else 24)
        else:
            t.add_column(name, no_wrap=True, overflow="ellipsis")
    now = snapshot.get("summary", {}).get("now", time.time())
    for n in nodes:
        usable = n.get("usable")
        health = Text("ok" if usable else (n.get("reason") or "unusable"), style="green" if usable else "red")
        probed = n.get("last_probe")
        row: list[RenderableType] = [
            n.get("name", "?"),
            n.get("role") or "unknown",
            health,
            _bytes(n.get("lag_bytes")),
            _duration(n.get("lag_seconds")) if n.get("lag_seconds") is not None else "-",
            _duration(now - probed) + " ago" if isinstance(probed, int | float) else "-",
        ]
        if wide:
            row.insert(0, n.get("cluster", ""))
        t.add_row(*row)
    return t


def clients_panel(snapshot: dict[str, Any], wide: bool) -> Table:
    t = _table("Clients", wide=wide)
    by_state = snapshot.get("clients_by_state", {})
    t.add_column("state")
    t.add_column("clients", justify="right")
    for state, n in by_state.items():
        t.add_row(state, Text(str(n), style="bold red" if state == "waiting" and n else ""))
    return t


def queues_panel(snapshot: dict[str, Any], wide: bool) -> Table:
    t = _table("Wait queues", wide=wide)
    t.add_column("pool", no_wrap=True, overflow="ellipsis", max_width=32)
    t.add_column("waiting", justify="right")
    t.add_column("oldest", justify="right")
    t.add_column("why")
    queues = snapshot.get("queues", [])
    for q in queues:
        pool = "/".join(x for x in (q.get("database"), q.get("user")) if x)
        if q.get("node"):
            pool += "@" + str(q["node"])
        t.add_row(pool, str(q.get("waiting", 0)), _duration(q.get("oldest_wait")), q.get("reason", ""))
    if not queues:
        t.add_row("(nobody waits)", "", "", "")
    return t


def errors_panel(snapshot: dict[str, Any], wide: bool) -> Table:
    t = _table("Errors sent", wide=wide)
    t.add_column("sqlstate")
    t.add_column("name", overflow="ellipsis", no_wrap=True, max_width=32 if wide else 22)
    t.add_column("count", justify="right")
    errors = snapshot.get("errors", {})
    for code, n in sorted(errors.items(), key=lambda kv: -kv[1]):
        t.add_row(code, _SQLSTATE_NAMES.get(code, ""), _count(n))
    if not errors:
        t.add_row("(none)", "", "")
    return t


def decisions_panel(snapshot: dict[str, Any], wide: bool) -> Table:
    t = _table("Recent decisions", wide=wide)
    t.expand = True  # the reason takes what the short columns leave
    t.add_column("time", no_wrap=True, min_width=8)
    t.add_column("kind", no_wrap=True, min_width=6, max_width=16, overflow="ellipsis")
    t.add_column("client", no_wrap=True, overflow="ellipsis", min_width=6, max_width=24 if wide else 12)
    t.add_column("code", no_wrap=True, min_width=5)
    t.add_column("reason", overflow="ellipsis", no_wrap=True, ratio=1)
    decisions = snapshot.get("decisions", [])[:DECISIONS_SHOWN]
    for d in decisions:
        who = f"#{d['client']} {d['user']}" if d.get("client") else d.get("user", "")
        t.add_row(
            time.strftime("%H:%M:%S", time.localtime(d.get("at", 0))),
            d.get("kind", ""),
            who,
            d.get("sqlstate", ""),
            d.get("reason", ""),
        )
    if not decisions:
        t.add_row("", "(none yet)", "", "", "")
    return t


def plugin_panel(name: str, panel: StatusPanel | Exception, wide: bool) -> RenderableType:
    if isinstance(panel, Exception):
        t = _table(f"{name}: error", wide=wide)
        t.add_column("error", overflow="fold")
        t.add_row(Text(repr(panel), style="red"))
        return t
    t = _table(panel.title, wide=wide)
    for column in panel.columns:
        t.add_column(column, overflow="ellipsis", no_wrap=True)
    for row in panel.rows:
        t.add_row(*[str(cell) for cell in row][: len(panel.columns)])
    if panel.note:
        return Group(t, Text(panel.note, style="dim"))
    return t


def render(
    snapshot: dict[str, Any],
    width: int,
    panels: Sequence[tuple[str, StatusPanel | Exception]] = (),
    error: str | None = None,
) -> RenderableType:
    """One screen of `halephant status` for a terminal `width` columns wide."""
    wide = width >= WIDE
    parts: list[RenderableType] = [header(snapshot)]
    if error:
        parts.append(Text(error, style="bold red"))
    parts.append(pools_panel(snapshot, wide))
    if wide:
        row = Table.grid(padding=(0, 4))
        row.add_row(nodes_panel(snapshot, wide), clients_panel(snapshot, wide), errors_panel(snapshot, wide))
        parts.append(row)
    else:
        parts.append(nodes_panel(snapshot, wide))
        small = Table.grid(padding=(0, 3))
        small.add_row(clients_panel(snapshot, wide), errors_panel(snapshot, wide))
        parts.append(small)
    parts.append(queues_panel(snapshot, wide))
    parts.append(decisions_panel(snapshot, wide))
    parts += [plugin_panel(name, panel, wide) for name, panel in panels]
    return Group(*parts)


# --- the commands ---------------------------------------------------------------------------------------


def print_once(url: str, console: Console, panels: PanelSource | None, as_json: bool) -> int:
    try:
        snapshot = fetch(url)
    except StatusError as exc:
        print(f"halephant status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
        return 0
    extra = panels(snapshot) if panels is not None else ()
    console.print(render(snapshot, console.width, extra))
    return 0


class _NaturalHeight:
    """Renders its content at its natural height: Live passes the terminal's height down, and nested
    grids would pad every cell to it."""

    def __init__(self, content: RenderableType) -> None:
        self.content = content

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from console.render(self.content, options.reset_height())


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A function that waits up to `timeout` seconds for a key press ('' if none); cbreak mode on a tty."""
    if not sys.stdin.isatty():

        def sleep_only(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield sleep_only
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def read_key(timeout: float) -> str:
            ready, _, _ = select.select([fd], [], [], timeout)
            return os.read(fd, 1).decode(errors="replace") if ready else ""

        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def watch(url: str, console: Console, panels: PanelSource | None, interval: float = 1.0) -> int:
    """Refresh in place until `q` (or Ctrl-C)."""
    snapshot: dict[str, Any] = {}
    try:
        with _keys() as read_key, Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                error = None
                try:
                    snapshot = fetch(url)
                except StatusError as exc:
                    error = f"{exc} (retrying)"
                extra = panels(snapshot) if panels is not None and snapshot else ()
                footer = Text("q: quit", style="dim")
                view = Group(render(snapshot, console.width, extra, error), footer)
                live.update(_NaturalHeight(view), refresh=True)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if read_key(left).lower() == "q":
                        return 0
    except KeyboardInterrupt:
        return 0
