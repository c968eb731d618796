"""Alembic environment and revisions (inside the package, so an installed wheel can migrate)."""
