"""OpenAI-shaped fine-tuning: uploaded files, job checkpoints, pause, webhook deliveries

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('train_jobs') as batch:
        batch.add_column(sa.Column('pause_requested', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('suffix', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('job_metadata', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('training_file', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('validation_file', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('base_adapter_id', sa.String(length=32), nullable=True))
    op.create_table('job_checkpoints',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('adapter_id', sa.String(length=32), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['train_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_job_checkpoints_job_id', 'job_checkpoints', ['job_id'])
    op.create_table('uploaded_files',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('examples', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('storage_key', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_uploaded_files_created_at', 'uploaded_files', ['created_at'])
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('url', sa.String(length=2000), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['train_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_webhook_deliveries_job_id', 'webhook_deliveries', ['job_id'])
    op.create_index('ix_webhook_deliveries_status', 'webhook_deliveries', ['status'])
    op.create_index('ix_webhook_deliveries_next_attempt_at', 'webhook_deliveries', ['next_attempt_at'])


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_table('uploaded_files')
    op.drop_table('job_checkpoints')
    with op.batch_alter_table('train_jobs') as batch:
        for column in ('base_adapter_id', 'validation_file', 'training_file', 'job_metadata', 'suffix', 'pause_requested'):
            batch.drop_column(column)
