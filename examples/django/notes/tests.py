"""A tiny test suite, run by `manage.py test` through halephant: Django creates `test_myapp` through the
catch-all `'*'` database entry, migrates it on the primary and drops it at the end.

The tests use `default` only: a streaming replica receives a freshly created test database a moment
later, so a test that read through `replica` right after creation could race the replay.
"""

from django.db import connections
from django.test import TestCase

from notes.models import Note


class NoteTests(TestCase):
    def test_a_note_is_written_and_read_back_on_the_primary(self):
        Note.objects.create(text="hello")
        self.assertEqual(Note.objects.using("default").filter(text="hello").count(), 1)

    def test_the_test_database_is_on_the_primary(self):
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT current_database(), pg_is_in_recovery()")
            self.assertEqual(cursor.fetchone(), ("test_myapp", False))
