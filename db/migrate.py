"""Create the database if it is missing, then bring it to the newest migration."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql

from db.settings import maintenance_url, sqlalchemy_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def database_name(url: str) -> str:
    """The database `url` names; libpq's choice (PGDATABASE, else the user name) when none."""
    path = urlsplit(url).path.lstrip("/")
    return path or os.environ.get("PGDATABASE") or os.environ.get("USER") or "postgres"


def create_database(url: str) -> bool:
    """CREATE DATABASE when it does not exist yet. Returns True when it was created."""
    name = database_name(url)
    with psycopg.connect(maintenance_url(url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False
    return True


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def migrate(url: str) -> None:
    create_database(url)
    upgrade(url)
