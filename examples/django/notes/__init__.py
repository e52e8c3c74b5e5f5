"""A one-model app for the halephant routing example."""
