"""Alembic environment: online migrations against DATABASE_URL (or the URL set by the caller)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from db.schema import metadata
from db.settings import database_url, sqlalchemy_url

config = context.config
_NOT_OURS = {"backlog", "dead_letters", "alembic_version"}


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Views are created by hand-written SQL in the migrations; they are not tables to compare.
    if type_ == "table" and reflected and compare_to is None and name in _NOT_OURS:
        return False
    return True


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or sqlalchemy_url(database_url())
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            include_schemas=True,
            include_object=_include_object,
            compare_type=True,
            version_table_schema="public",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
