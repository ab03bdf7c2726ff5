"""The admin pages' number and date wording."""

from datetime import UTC, datetime, timedelta

import pytest

from app.admin import formatting

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("n, text", [(None, "—"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5544, "5.4 KiB"),
                                     (3 * 1024**3, "3.0 GiB"), (5 * 1024**5, "5120.0 TiB")])
def test_filesize(n, text):
    assert formatting.filesize(n) == text


@pytest.mark.parametrize("seconds, text", [(10, "just now"), (50, "1 minute ago"), (3599, "59 minutes ago"),
                                           (3600, "1 hour ago"), (86400 * 3 + 5, "3 days ago"), (86400 * 40, "2025-04-22")])
def test_ago(seconds, text):
    assert formatting.ago(NOW - timedelta(seconds=seconds), now=NOW) == text


@pytest.mark.parametrize("seconds, text", [(-5, "any moment"), (40, "in 40 s"), (12 * 60 + 5, "in 12 min"),
                                           (3 * 3600 + 5 * 60, "in 3 h 5 min")])
def test_until(seconds, text):
    assert formatting.until(NOW + timedelta(seconds=seconds), now=NOW) == text


@pytest.mark.parametrize("key, value, text", [("eval_accuracy", 0.8846, "88.5%"), ("eval_accuracy", 1, "100.0%"),
                                              ("eval_loss", 0.312749, "0.312749"), ("duration_s", 900.24, "900.24 s"),
                                              ("steps", 12000, "12,000"), ("stopped_early", False, "no"),
                                              ("eval_loss", None, "—"), ("note", "text", "text")])
def test_metric(key, value, text):
    assert formatting.metric(value, key) == text
