"""Budget reservations tied to the process that holds them: ``reservation_holders`` and ``reservations``.

Each reservation (``api_keys.reserved_usd`` is their sum) gets a row naming its holder process, so the
reservations of a process that died are released at the next start on its host, or by any replica
once the holder's heartbeat is older than ``database.reservation_ttl_s``.

Revision ID: 0004_reservation_holders
Revises: 0003
Create Date: 2026-12-05 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004_reservation_holders'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'reservation_holders',
        sa.Column('holder', sa.String(length=128), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('holder', name=op.f('pk_reservation_holders')),
    )
    op.create_index(op.f('ix_reservation_holders_heartbeat_at'), 'reservation_holders', ['heartbeat_at'])
    op.create_table(
        'reservations',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('key_id', sa.Integer(), nullable=False),
        sa.Column('holder', sa.String(length=128), nullable=False),
        sa.Column('amount_usd', sa.Float(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_reservations_key_id_api_keys'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_reservations')),
    )
    op.create_index(op.f('ix_reservations_holder'), 'reservations', ['holder'])
    op.create_index(op.f('ix_reservations_key_id'), 'reservations', ['key_id'])
    op.create_index(op.f('ix_reservations_released_at'), 'reservations', ['released_at'])


def downgrade() -> None:
    op.drop_index(op.f('ix_reservations_released_at'), table_name='reservations')
    op.drop_index(op.f('ix_reservations_key_id'), table_name='reservations')
    op.drop_index(op.f('ix_reservations_holder'), table_name='reservations')
    op.drop_table('reservations')
    op.drop_index(op.f('ix_reservation_holders_heartbeat_at'), table_name='reservation_holders')
    op.drop_table('reservation_holders')
