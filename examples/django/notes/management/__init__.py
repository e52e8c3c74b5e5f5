"""Management commands of the notes app."""
