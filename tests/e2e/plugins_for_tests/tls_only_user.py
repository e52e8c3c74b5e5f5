"""A `halephant_authenticate` plugin that lets user ``myapp_ro`` in only over TLS (`ClientInfo.tls`), for
the client TLS tests: a plugin can require TLS of some users where `client_tls.mode` allows plaintext."""

from __future__ import annotations

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, Reject

TLS_ONLY_USER = "myapp_ro"


@hookimpl
def halephant_authenticate(client: ClientInfo) -> Reject | None:
    if client.user == TLS_ONLY_USER and client.tls is None:
        return Reject(
            sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
            f'user "{client.user}" may connect only over TLS',
            reason="tls_only_user: plaintext",
        )
    return None
