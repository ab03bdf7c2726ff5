"""ORM models: the registry's tables."""

import secrets
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, TypeDecorator
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


def new_id() -> str:
    """Short, URL-safe, unguessable id."""
    return secrets.token_hex(6)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), index=True)
    base_fingerprint: Mapped[str] = mapped_column(String(200))
    num_virtual_tokens: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # "trained" or "imported"
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    template: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
