"""Budgets as a hard cap: models.max_output_tokens, requests.usage_corrected.

- ``models.max_output_tokens`` (NULL: unknown here): the most completion tokens one answer of the model
  may have; it bounds the budget estimate of a request that sets no ``max_tokens``.
- ``requests.usage_corrected`` (default false): the provider reported usage that was impossible
  (negative, or far beyond what the request could produce) and the gateway logged and charged the
  counted figure instead.

Revision ID: 0006_model_max_output
Revises: 0005_feedback_once
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006_model_max_output'
down_revision: str | None = '0005_feedback_once'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('max_output_tokens', sa.Integer(), nullable=True))
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('usage_corrected', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('usage_corrected')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('max_output_tokens')
