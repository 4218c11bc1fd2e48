"""Sessions of the trace viewer's login: a hash of each session token, never the token.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "ui_sessions",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        schema=schema,
    )
    op.create_index("ix_ui_sessions_key_id", "ui_sessions", ["key_id"], schema=schema)
    op.create_index("ix_ui_sessions_expires_at", "ui_sessions", ["expires_at"], schema=schema)


def downgrade() -> None:
    op.drop_table("ui_sessions", schema=op.get_context().version_table_schema)
