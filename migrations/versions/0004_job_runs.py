"""job run tokens (fencing) and message sent times

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('train_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_token', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('train_jobs', schema=None) as batch_op:
        batch_op.drop_column('sent_at')
        batch_op.drop_column('run_token')
