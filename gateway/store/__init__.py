"""The store: every SQL statement, the table mapping and the Alembic migrations (``migrations/``)."""
