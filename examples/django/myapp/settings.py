"""Settings of the halephant routing example: the two connections of halephant's Django page.

Both point at halephant (HOST 127.0.0.1, PORT from $HALEPHANT_PORT, default 6432) with different users:
`default` logs in as `myapp` and is served by the primary; `replica` logs in as `myapp_ro`, which
halephant marks `read_only` and serves from a streaming replica, logging in upstream as `myapp`
(`server_user`). SSL is off and server-side cursors are disabled, as transaction pooling requires.
"""

import os

PORT = int(os.environ.get("HALEPHANT_PORT", "6432"))

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": PORT,
        "NAME": "myapp",
        "USER": "myapp",
        "PASSWORD": os.environ.get("MYAPP_PASSWORD", "myapp"),
        "OPTIONS": {"sslmode": "disable"},
        "DISABLE_SERVER_SIDE_CURSORS": True,
    },
    "replica": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": PORT,
        "NAME": "myapp",
        "USER": "myapp_ro",
        "PASSWORD": os.environ.get("MYAPP_RO_PASSWORD", "myapp_ro"),
        "OPTIONS": {"sslmode": "disable"},
        "DISABLE_SERVER_SIDE_CURSORS": True,
    },
}

DATABASE_ROUTERS = ["myapp.routers.ReadReplicaRouter"]

INSTALLED_APPS = ["notes"]
SECRET_KEY = "only-for-the-halephant-example"
ROOT_URLCONF = "myapp.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
