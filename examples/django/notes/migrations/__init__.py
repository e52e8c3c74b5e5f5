"""Migrations of the notes app (run on `default` only, by the router)."""
