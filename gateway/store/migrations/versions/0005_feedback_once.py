"""Tenant isolation: one feedback per request, trusted keys, the client's request id kept apart.

- ``feedback.request_id`` becomes unique (the index ``ix_feedback_request_id`` is recreated as a
  unique index). Rows already repeated are reduced to the first of each request (lowest id) before
  the index is built, so an upgrade never fails on existing duplicates.
- ``api_keys.trusted`` (default false): with ``profiling.feedback_from: trusted`` only these keys'
  feedback counts in re-profiling.
- ``requests.client_request_id``: the id a client sent (``x-uniroute-client-request-id``); the
  ``request_id`` column holds the gateway's own id from now on.

Revision ID: 0005_feedback_once
Revises: 0004_reservation_holders
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005_feedback_once'
down_revision: str | None = '0004_reservation_holders'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # keep the first feedback row of each request: the unique index below would refuse repeats
    op.execute(sa.text("DELETE FROM feedback WHERE id NOT IN "
                       "(SELECT first_id FROM (SELECT MIN(id) AS first_id FROM feedback GROUP BY request_id) AS firsts)"))
    op.drop_index(op.f('ix_feedback_request_id'), table_name='feedback')
    op.create_index(op.f('ix_feedback_request_id'), 'feedback', ['request_id'], unique=True)
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('trusted', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('client_request_id', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('client_request_id')
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_column('trusted')
    op.drop_index(op.f('ix_feedback_request_id'), table_name='feedback')
    op.create_index(op.f('ix_feedback_request_id'), 'feedback', ['request_id'], unique=False)
