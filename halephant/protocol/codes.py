"""Message type bytes and startup codes of the PostgreSQL frontend/backend protocol 3.0, named as in the docs.

Types are ints (what indexing a bytes object gives), so the hot path compares ints without allocating.
"""

from __future__ import annotations

# --- frontend (client -> server) ---
BIND = ord("B")
CLOSE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
DESCRIBE = ord("D")
EXECUTE = ord("E")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
PARSE = ord("P")
PASSWORD_MESSAGE = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")

#: every type byte a client may send after login
FRONTEND_TYPES = frozenset(
    (
        BIND,
        CLOSE,
        COPY_DATA,
        COPY_DONE,
        COPY_FAIL,
        DESCRIBE,
        EXECUTE,
        FLUSH,
        FUNCTION_CALL,
        PARSE,
        QUERY,
        SYNC,
        TERMINATE,
    )
)

# --- backend (server -> client) ---
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
COMMAND_COMPLETE = ord("C")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
DATA_ROW = ord("D")
EMPTY_QUERY_RESPONSE = ord("I")
ERROR_RESPONSE = ord("E")
FUNCTION_CALL_RESPONSE = ord("V")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NO_DATA = ord("n")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
PARAMETER_DESCRIPTION = ord("t")
PARAMETER_STATUS = ord("S")
PARSE_COMPLETE = ord("1")
PORTAL_SUSPENDED = ord("s")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")

# --- Authentication request codes (payload of 'R') ---
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# --- transaction status in ReadyForQuery ---
TX_IDLE = ord("I")
TX_IN_TRANSACTION = ord("T")
TX_FAILED = ord("E")

# --- startup-phase request codes (first int32 after the length) ---
PROTOCOL_3_0 = 3 << 16
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

#: PostgreSQL refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH)
MAX_STARTUP_PACKET_LENGTH = 10000
