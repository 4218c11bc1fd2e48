"""The spend ledger: budgets, reservations, spend.

The schema of openfusion's first releases, which created these tables without Alembic. On such a
database (the tables there, no ``alembic_version``) this revision finds them and creates only what
is missing, so the database joins the migrations where it stands.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("budgets", schema=schema):
        op.create_table(
            "budgets",
            sa.Column("key_id", sa.String(), primary_key=True),
            sa.Column("limit_nano", sa.BigInteger(), nullable=False),
            schema=schema,
        )
    if not inspector.has_table("reservations", schema=schema):
        op.create_table(
            "reservations",
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("key_id", sa.String(), nullable=False),
            sa.Column("amount_nano", sa.BigInteger(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            schema=schema,
        )
        op.create_index("ix_reservations_key_id", "reservations", ["key_id"], schema=schema)
    if not inspector.has_table("spend", schema=schema):
        op.create_table(
            "spend",
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
            sa.Column("key_id", sa.String(), nullable=True),
            sa.Column("generation_id", sa.String(), nullable=False),
            sa.Column("stage", sa.String(), nullable=False),
            sa.Column("model", sa.String(), nullable=True),
            sa.Column("cost_nano", sa.BigInteger(), nullable=True),
            sa.Column("unpriced", sa.Boolean(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            schema=schema,
        )
        op.create_index("ix_spend_key_id", "spend", ["key_id"], schema=schema)
        op.create_index("ix_spend_generation_id", "spend", ["generation_id"], schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    for table in ("spend", "reservations", "budgets"):
        op.drop_table(table, schema=schema)
