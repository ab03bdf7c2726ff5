"""Database engine and sessions."""

from pathlib import Path

from sqlalchemy import Engine, Select, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine, info: dict | None = None) -> sessionmaker[Session]:
    """`info`: what every session carries for the code that uses it (app.webhooks' targets)."""
    return sessionmaker(engine, expire_on_commit=False, info=info)


# The largest values the databases hold: OFFSET is 64-bit on SQLite and PostgreSQL, and INTEGER
# columns (job event ids) are 32-bit on PostgreSQL. Larger paging positions overflow there, so the
# API refuses them. 2**62, not 2**63 - 1: a JSON Schema maximum is read as a double, and 2**63 - 1
# is not one (it rounds up, past what the databases hold).
MAX_OFFSET = 2**62
MAX_INTEGER = 2**31 - 1


def get_by_id(session: Session, model: type, key: str):
    """session.get, except that a key holding NUL finds nothing: no id holds one, and PostgreSQL
    text cannot (it would fail the query)."""
    return None if "\x00" in key else session.get(model, key)


def paginate(session: Session, query: Select, *order_by, limit: int, offset: int) -> tuple[list, int]:
    """One page of `query`'s rows and the total count of all of them."""
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    items = session.scalars(query.order_by(*order_by).limit(limit).offset(offset)).all()
    return list(items), int(total or 0)
