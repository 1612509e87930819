"""Alembic migrations of the relational records (run by `records.db.Database.migrate`)."""
