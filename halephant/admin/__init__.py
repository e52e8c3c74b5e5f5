"""The operator's surface of a running halephant: state snapshots (`snapshot`), the HTTP admin API with
Prometheus metrics (`http`, `metrics`), the PgBouncer-compatible SQL console (`console`) and the
commands both can run (`control`: PAUSE, RESUME, RECONNECT, KILL)."""
