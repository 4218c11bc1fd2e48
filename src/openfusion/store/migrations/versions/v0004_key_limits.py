"""Per-key rate limits: requests and tokens per minute on ``api_keys`` (NULL: no limit).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    with op.batch_alter_table("api_keys", schema=schema) as batch:
        batch.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tpm", sa.Integer(), nullable=True))


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    with op.batch_alter_table("api_keys", schema=schema) as batch:
        batch.drop_column("tpm")
        batch.drop_column("rpm")
