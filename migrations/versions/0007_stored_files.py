"""shared storage's database backend: adapter weights and uploaded datasets as blobs under server-made keys

Revision ID: 0007
Revises: 0006

Files an install kept under DATA_DIR stay there: `python -m app.cli move-files-to-database` moves
them in (or set STORAGE=directory to keep reading them where they are).
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('stored_files',
    sa.Column('key', sa.String(length=100), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key', 'name')
    )


def downgrade() -> None:
    op.drop_table('stored_files')
