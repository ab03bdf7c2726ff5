"""Jinja filters that turn raw values into what a person reads: sizes, dates, percentages."""

from datetime import datetime

from app.models import utcnow

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
MISSING = "—"


def filesize(n: int | None) -> str:
    if n is None:
        return MISSING
    size, unit = float(n), 0
    while abs(size) >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def number(n: int | float | None) -> str:
    return MISSING if n is None else f"{n:,}"


def percent(x: float | None) -> str:
    return MISSING if x is None else f"{x * 100:.1f}%"


def decimal(x: float | None, digits: int = 4) -> str:
    return MISSING if x is None else f"{x:.{digits}g}"


def timestamp(dt: datetime | None) -> str:
    return MISSING if dt is None else dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(dt: datetime | None, now: datetime | None = None) -> str:
    """"just now", "5 minutes ago", "3 days ago"; older than a month: the date."""
    if dt is None:
        return MISSING
    seconds = ((now or utcnow()) - dt).total_seconds()
    if seconds < 45:
        return "just now"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            count = int(seconds // size)
            if unit == "day" and count > 30:
                return dt.strftime("%Y-%m-%d")
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "1 minute ago"


def until(dt: datetime | None, now: datetime | None = None) -> str:
    """How long until `dt`: "in 40 s", "in 12 min", "in 3 h 5 min"."""
    if dt is None:
        return MISSING
    seconds = int((dt - (now or utcnow())).total_seconds())
    if seconds <= 0:
        return "any moment"
    if seconds < 60:
        return f"in {seconds} s"
    minutes = seconds // 60
    return f"in {minutes} min" if minutes < 60 else f"in {minutes // 60} h {minutes % 60} min"


def metric(value, key: str) -> str:
    """One of an adapter's metrics, by what its name says it is."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key.endswith("accuracy"):
        return percent(value)
    if isinstance(value, float):
        return decimal(value, 6) + (" s" if key.endswith("_s") else "")
    if isinstance(value, int):
        return number(value)
    return str(value)


FILTERS = {"filesize": filesize, "number": number, "percent": percent, "decimal": decimal,
           "timestamp": timestamp, "ago": ago, "until": until, "metric": metric}
