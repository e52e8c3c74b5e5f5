"""`halephant demo`: a throwaway PostgreSQL primary + streaming replica, and halephant in front of them.

Everything lives in one temporary directory and goes away on Ctrl-C. The config written there is an
ordinary halephant.yaml, printed so the user can copy it. halephant listens on TCP and on a Unix-domain
socket in the demo's directory (`unix_socket_dir`).
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from pathlib import Path

import click

DEMO_CONFIG = """\
# halephant demo configuration (written by `halephant demo`)
listen: 127.0.0.1:{port}
unix_socket_dir: {socket_dir}   # also listens on {socket_dir}/.s.PGSQL.{port} (psql -h {socket_dir})
clusters:
  main:
    nodes: [127.0.0.1:{primary}, 127.0.0.1:{replica}]   # any order: roles are probed
databases:
  myapp:
    cluster: main
    mode: transaction
    pool_size: 10
  myapp_session:
    cluster: main
    database: myapp
    mode: session
    pool_size: 5
  '*':                # any other database (e.g. Django's test_myapp), under its own name
    cluster: main
users:
  myapp:
    password: myapp
  myapp_ro:           # Django's `replica` connection
    password: myapp_ro
    read_only: true   # served by the replica; switching to read-write is refused (25006)
    server_user: myapp  # logs in upstream as myapp, with pools of its own
"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(*, port: int | None = None, base_dir: Path | None = None) -> int:
    from halephant.cli import FdLimitTooLow, load, run_app
    from halephant.logs import setup_logging
    from halephant.testing.pgcluster import Cluster, PgError, PgNotFound, free_port

    if port is None:
        port = 6432 if _port_free(6432) else free_port()
    click.echo("starting a throwaway PostgreSQL primary and streaming replica ...")
    try:
        cluster = Cluster.start(replicas=1, base_dir=base_dir)
    except PgNotFound as exc:
        click.echo(f"halephant demo: {exc}", err=True)
        return 1
    except PgError as exc:
        click.echo(f"halephant demo: PostgreSQL failed to start: {exc}", err=True)
        return 1
    # the demo's halephant.yaml (with its passwords) lives as long as the demo, like PostgreSQL's data
    workdir = Path(tempfile.mkdtemp(prefix="halephant-demo-"))
    try:
        # myapp_ro needs no role of its own: halephant logs it in upstream as myapp (server_user)
        cluster.create_role("myapp", "myapp", createdb=True)
        cluster.create_database("myapp", owner="myapp")
        cluster.wait_replicated()
        config_path = workdir / "halephant.yaml"
        config_path.write_text(
            DEMO_CONFIG.format(
                port=port,
                socket_dir=workdir,
                primary=cluster.primary.port,
                replica=cluster.replicas[0].port,
            )
        )
        config, plugins = load(str(config_path))
        setup_logging(config.logging.level, config.logging.format)

        def ready(_app: object) -> None:
            click.echo(
                "\n"
                f"  PostgreSQL primary  127.0.0.1:{cluster.primary.port}   (data in {cluster.base_dir})\n"
                f"  PostgreSQL replica  127.0.0.1:{cluster.replicas[0].port}   (streaming)\n"
                f"  halephant           127.0.0.1:{port}   (config: {config_path})\n"
                "\n"
                "  Read-write, served by the primary (transaction pooling):\n"
                f'    psql "host=127.0.0.1 port={port} user=myapp password=myapp dbname=myapp"\n'
                "  Read-only, served by the replica (try: SELECT pg_is_in_recovery();):\n"
                f'    psql "host=127.0.0.1 port={port} user=myapp_ro password=myapp_ro dbname=myapp"\n'
                "  Django (examples/django, the default and replica connections of the settings above):\n"
                f"    HALEPHANT_PORT={port} python manage.py migrate && "
                f"HALEPHANT_PORT={port} python manage.py routing_demo\n"
                "  Session pooling:\n"
                f'    psql "host=127.0.0.1 port={port} user=myapp password=myapp dbname=myapp_session"\n'
                "  Over halephant's Unix-domain socket (unix_socket_dir):\n"
                f'    psql "host={workdir} port={port} user=myapp password=myapp dbname=myapp"\n'
                "  Load test:\n"
                f"    PGPASSWORD=myapp pgbench -i -h 127.0.0.1 -p {cluster.primary.port} -U myapp myapp\n"
                f"    PGPASSWORD=myapp pgbench -n -S -c 20 -T 10 -h 127.0.0.1 -p {port} -U myapp myapp\n"
                "\n"
                "  Press Ctrl-C to stop everything.\n",
                err=True,
            )
            sys.stderr.flush()

        try:
            run_app(config, plugins, on_ready=ready)
        except FdLimitTooLow as exc:
            click.echo(f"halephant: {exc}", err=True)
            return 1
        except KeyboardInterrupt:
            pass
    finally:
        click.echo("stopping PostgreSQL and removing the demo directories ...", err=True)
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
