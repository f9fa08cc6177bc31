"""Alembic environment: runs migrations against the URL set by models.db.migrate or alembic.ini."""

from alembic import context
from sqlmodel import SQLModel

import models.delivery  # noqa: F401
import models.inbound_sms  # noqa: F401
import models.outbox  # noqa: F401
import models.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from models.db import make_engine

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
