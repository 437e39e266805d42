"""alembic environment: migrations run on the connection the hub hands over."""

from __future__ import annotations

from alembic import context

from hub.storage import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `saia hub db upgrade` (hub.storage.upgrade)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
