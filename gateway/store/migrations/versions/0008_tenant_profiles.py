"""Tenant-private profiles: ``tenant_profiles``, one key's labels per model and router as per-cluster sums.

Revision ID: 0008_tenant_profiles
Revises: 0007_budget_policy
Create Date: 2026-11-30 01:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008_tenant_profiles'
down_revision: str | None = '0007_budget_policy'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('tenant_profiles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('router_version', sa.String(length=64), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=False),
    sa.Column('errors', sa.JSON(), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('labels', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenant_profiles')),
    sa.UniqueConstraint('key_id', 'router_version', 'model_name', 'source',
                        name=op.f('uq_tenant_profiles_key_id_router_version_model_name_source'))
    )
    with op.batch_alter_table('tenant_profiles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tenant_profiles_key_id'), ['key_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tenant_profiles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tenant_profiles_key_id'))
    op.drop_table('tenant_profiles')
