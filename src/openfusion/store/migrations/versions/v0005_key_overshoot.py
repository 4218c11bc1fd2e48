"""An API key's overshoot: what its requests cost beyond what they had reserved.

An upstream that ignores ``max_tokens`` bills more than a request could reserve; the spend
ledger records the real cost, and the key's record says how much of it was beyond the budget's
reach, so an operator sees it (``openfusion keys list``, the 402 body).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column(
        "api_keys",
        sa.Column("overshoot_nano", sa.BigInteger(), nullable=False, server_default="0"),
        schema=schema,
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    with op.batch_alter_table("api_keys", schema=schema) as batch:
        batch.drop_column("overshoot_nano")
