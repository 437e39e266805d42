"""The tables of the Files and Batches API (schema: alembic revisions 0003 and 0004)."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Float, Index, Integer, String, Table, Text

from hub.storage import metadata

files = Table(
    "files",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(210), nullable=False),  # "user:NAME", or "key:ID" without a user
    Column("key_id", String(16), nullable=True),
    Column("user_name", String(200), nullable=True),
    Column("group_name", String(200), nullable=True),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("model", String(200), nullable=True),  # the one model of a batch input file
    Column("url", String(64), nullable=True),  # its one endpoint
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),  # removed then (None: kept until deleted)
    Index("ix_files_owner_created", "owner", "created_at"),
    Index("ix_files_expires_at", "expires_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(210), nullable=False),
    Column("key_id", String(16), nullable=True),
    Column("user_name", String(200), nullable=True),
    Column("group_name", String(200), nullable=True),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("upstream", String(100), nullable=False),
    Column("site", Integer, nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("price_factor", Float, nullable=False),
    Column("job_id", String(32), nullable=True),
    Column("errors", JSON, nullable=True),  # OpenAI's errors.data: [{code, message, line}]
    Column("meta", JSON, nullable=True),  # the client's metadata
    Column("message", Text, nullable=True),  # for operators: the agent's last word
    # The replica sending the input or copying the output, until when (hub/batches/lease.py).
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("output_expires_after", Float, nullable=True),  # seconds; None: the hub's default
    Index("ix_batches_owner_created", "owner", "created_at"),
    Index("ix_batches_status", "status"),
)
