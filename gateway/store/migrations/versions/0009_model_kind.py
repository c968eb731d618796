"""Endpoints beyond chat: ``models.kind`` (chat or embedding) and ``requests.endpoint``.

- ``models.kind``: what a model serves, ``chat`` (``/v1/chat/completions``, ``/v1/responses``,
  ``/v1/messages``; the only kind ``auto`` routes to) or ``embedding`` (``/v1/embeddings``). Existing
  rows are chat models.
- ``requests.endpoint``: the API a request called (``chat``, ``responses``, ``messages``,
  ``embeddings``). Existing rows were chat completions.

Revision ID: 0009_model_kind
Revises: 0008_tenant_profiles
Create Date: 2026-12-05 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009_model_kind'
down_revision: str | None = '0008_tenant_profiles'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), server_default='chat', nullable=False))
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('endpoint', sa.String(length=16), server_default='chat', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('endpoint')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('kind')
