"""Impact reports of profiling: ``model_impacts``, the report, the profile waiting for activation, the follow-up.

Revision ID: 0010_model_impacts
Revises: 0009_model_kind
Create Date: 2026-11-30 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010_model_impacts'
down_revision: str | None = '0009_model_kind'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_impacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=False),
    sa.Column('artifact_version', sa.String(length=64), nullable=False),
    sa.Column('variant', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('profiles', sa.JSON(), nullable=False),
    sa.Column('report', sa.JSON(), nullable=True),
    sa.Column('report_error', sa.String(length=512), nullable=True),
    sa.Column('inputs', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('followup', sa.JSON(), nullable=True),
    sa.Column('followup_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_impacts'))
    )
    with op.batch_alter_table('model_impacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_impacts_model_name'), ['model_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_model_impacts_activated_at'), ['activated_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_impacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_impacts_activated_at'))
        batch_op.drop_index(batch_op.f('ix_model_impacts_model_name'))
    op.drop_table('model_impacts')
