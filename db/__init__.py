"""Database access: settings, connections, table metadata and Alembic migrations."""
