"""Per-model connect and first-token timeouts: models.connect_timeout_s, models.first_token_timeout_s.

NULL means the default: connect 5 s (at most timeout_s), first token = timeout_s.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('connect_timeout_s', sa.Float(), nullable=True))
        batch.add_column(sa.Column('first_token_timeout_s', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('first_token_timeout_s')
        batch.drop_column('connect_timeout_s')
