"""The Django project of the halephant routing example: settings and the read-replica router."""
