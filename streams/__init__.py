"""Event schemas, code tables, validation, the bus and the stream processors."""
