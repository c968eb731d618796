"""Budget-paced λ: ``api_keys.budget_policy`` and the pacer's shared state ``key_pacing``.

- ``api_keys.budget_policy`` (``block`` by default, or ``pace``): a paced key's λ is adjusted online so its
  spend tracks budget × elapsed share of the period (docs/PACING.md); the hard cap holds either way.
- ``key_pacing``: one row per paced key, the controller's state (λ in use, integral, exposure, period,
  last step, a version for compare-and-set writes), shared by every replica.

Revision ID: 0007_budget_policy
Revises: 0006_model_max_output
Create Date: 2026-12-06 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007_budget_policy'
down_revision: str | None = '0006_model_max_output'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('budget_policy', sa.String(length=8), server_default='block', nullable=False))
        batch.create_check_constraint('budget_policy', "budget_policy IN ('block', 'pace')")
    op.create_table(
        'key_pacing',
        sa.Column('key_id', sa.Integer(), nullable=False),
        sa.Column('lam', sa.Float(), nullable=False),
        sa.Column('integral', sa.Float(), nullable=False),
        sa.Column('exposure', sa.Float(), nullable=False),
        sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_key_pacing_key_id_api_keys'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('key_id', name=op.f('pk_key_pacing')),
    )


def downgrade() -> None:
    op.drop_table('key_pacing')
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_constraint('budget_policy', type_='check')
        batch.drop_column('budget_policy')
