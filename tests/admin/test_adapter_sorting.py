"""The adapter list's sort and paging: a whitelist of columns, stable order, and 10,000 rows
paged in SQL (the admin table and GET /adapters share registry.list_adapters)."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert

from app import registry
from app.models import Adapter

N = 10_000


def make_rows(n: int, fingerprint: str) -> list[dict]:
    """Names are a permutation of the insertion order, sizes repeat (ties), half have no accuracy."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        dict(id=f"{i:012x}", name=f"adapter-{(i * 7919) % n:05d}", base_fingerprint=fingerprint,
             num_virtual_tokens=1 + i % 50, sha256="0" * 64, size_bytes=1000 + (i * 37) % 5000,
             source="trained" if i % 2 == 0 else "imported",
             metrics={"eval_accuracy": (i * 13) % 1000 / 1000} if i % 2 == 0 else {},
             template=None, created_at=start + timedelta(seconds=i))
        for i in range(n)
    ]


def expected_order(rows: list[dict], sort: str) -> list[str]:
    """The order the sort must give, computed here in Python: column, then id, same direction."""
    column = sort.removeprefix("-")
    descending = sort.startswith("-")
    if column == "eval_accuracy":  # rows without the metric go last in both directions
        present = [r for r in rows if r["metrics"]]
        missing = [r for r in rows if not r["metrics"]]
        ordered = sorted(present, key=lambda r: (r["metrics"]["eval_accuracy"], r["id"]), reverse=descending)
        return [r["id"] for r in ordered] + [r["id"] for r in sorted(missing, key=lambda r: r["id"], reverse=descending)]
    return [r["id"] for r in sorted(rows, key=lambda r: (r[column], r["id"]), reverse=descending)]


def row_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-adapter-id="([0-9a-f]+)"', html)


@pytest.fixture
def ten_thousand(make_client, tiny_base):
    client = make_client(tiny_base)
    rows = make_rows(N, tiny_base.fingerprint)
    with client.app.state.runtime.sessions() as session:
        session.execute(insert(Adapter), rows)
        session.commit()
    return client, rows


@pytest.mark.parametrize("sort", ["name", "-name", "-size_bytes", "created_at", "eval_accuracy", "-eval_accuracy"])
def test_ten_thousand_adapters_sort_and_page_in_the_admin_table(ten_thousand, sort):
    client, rows = ten_thousand
    order = expected_order(rows, sort)
    first = client.get(f"/admin/adapters?sort={sort}&per_page=100")
    assert first.status_code == 200
    assert row_ids(first.text) == order[:100]
    assert "1–100 of 10,000 adapters" in first.text
    second = client.get(f"/admin/adapters?sort={sort}&per_page=100&page=2")
    assert row_ids(second.text) == order[100:200]
    last = client.get(f"/admin/adapters?sort={sort}&per_page=100&page=100")
    assert row_ids(last.text) == order[-100:]
    assert "9,901–10,000 of 10,000 adapters" in last.text and 'rel="next"' not in last.text
    past = client.get(f"/admin/adapters?sort={sort}&per_page=100&page=101")
    assert row_ids(past.text) == [] and "Page 101 is past the end." in past.text


def test_links_keep_the_search_and_sort(ten_thousand):
    client, rows = ten_thousand
    page = client.get("/admin/adapters?q=ADAPTER-0999&sort=-name")
    assert row_ids(page.text) == [r["id"] for r in sorted(rows, key=lambda r: r["name"], reverse=True)
                                  if r["name"].startswith("adapter-0999")]
    # The name heading flips the sort to ascending and keeps the search; paging links keep both.
    assert 'href="/admin/adapters?q=ADAPTER-0999&amp;sort=name"' in page.text
    paged = client.get("/admin/adapters?q=adapter-0&sort=size_bytes")
    assert 'href="/admin/adapters?q=adapter-0&amp;sort=size_bytes&amp;page=2"' in paged.text


def test_the_api_lists_with_the_same_sort(ten_thousand):
    client, rows = ten_thousand
    body = client.get("/adapters", params={"sort": "-size_bytes", "limit": 50, "offset": 150}).json()
    assert [a["id"] for a in body["items"]] == expected_order(rows, "-size_bytes")[150:200] and body["total"] == N


@pytest.mark.parametrize("sort", ["sha256", "template", "name; DROP TABLE adapters", "--name", "metrics"])
def test_only_whitelisted_columns_sort(make_client, tiny_base, sort):
    client = make_client(tiny_base)
    page = client.get("/admin/adapters", params={"sort": sort})
    assert page.status_code == 422 and "Invalid address: sort" in page.text
    assert client.get("/adapters", params={"sort": sort}).status_code == 422
    with client.app.state.runtime.sessions() as session, pytest.raises(ValueError, match="sort must be one of"):
        registry.list_adapters(session, sort=sort)


@pytest.mark.parametrize("sort", registry.SORTS)
def test_every_sort_orders_alike_on_sqlite_and_postgres(sessions, sort):
    rows = make_rows(60, "base@1")
    with sessions() as session:
        session.execute(insert(Adapter), rows)
        session.commit()
        items, total = registry.list_adapters(session, sort=sort, limit=25, offset=30)
    assert total == 60 and [a.id for a in items] == expected_order(rows, sort)[30:55]
