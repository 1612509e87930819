"""Adapters of the `VitalsStore` port: SQLite, InfluxDB (v1 and v2 write paths) and a write-behind buffer."""
