"""`manage.py routing_demo`: show where halephant sends each connection's queries.

Writes a note through `default`, asks each alias whether its server is a standby
(`pg_is_in_recovery()`), tries a write through `replica` (refused with SQLSTATE 25006) and shows that
the connection still works afterwards. With `--json` the results are printed as one JSON object.
"""

import json

from django.core.management.base import BaseCommand
from django.db import DatabaseError, connections

from notes.models import Note


def in_recovery(alias: str) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery()")
        return bool(cursor.fetchone()[0])


class Command(BaseCommand):
    help = "Show that halephant routes `default` to the primary and `replica` to a streaming replica."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print the results as JSON")

    def handle(self, *args, **options):
        note = Note.objects.create(text="written through default")
        results = {
            "note_id": note.id,
            "default_in_recovery": in_recovery("default"),
            "replica_in_recovery": in_recovery("replica"),
        }
        try:
            Note.objects.using("replica").create(text="written through replica")
            results["replica_write"] = "succeeded"
        except DatabaseError as exc:
            cause = exc.__cause__
            results["replica_write"] = getattr(cause, "sqlstate", None) or repr(exc)
            results["replica_write_message"] = str(exc).strip()
        results["replica_usable_after"] = in_recovery("replica")
        if options["json"]:
            self.stdout.write(json.dumps(results))
            return
        self.stdout.write(f"default -> pg_is_in_recovery() = {results['default_in_recovery']} (the primary)")
        self.stdout.write(f"replica -> pg_is_in_recovery() = {results['replica_in_recovery']} (a standby)")
        self.stdout.write(f"a write through replica: {results['replica_write']}")
        self.stdout.write(f"replica still usable afterwards: {results['replica_usable_after']}")
