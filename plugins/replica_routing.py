"""Which kind of node runs a transaction. In this version every cluster's first node is its primary and all
transactions go there; the decision still carries its reason so logs can explain it."""

from __future__ import annotations

from halephant import hookimpl
from halephant.types import ClientInfo, Role, Route

# Decisions are immutable: one per user, not one per transaction (this runs for every transaction).
_primary_for: dict[str, Route] = {}


@hookimpl(trylast=True)
def halephant_route(client: ClientInfo) -> Route:
    route = _primary_for.get(client.user)
    if route is None:
        if len(_primary_for) > 10000:
            _primary_for.clear()
        route = _primary_for[client.user] = Route(
            Role.PRIMARY, reason=f"primary: default route for {client.user}"
        )
    return route
