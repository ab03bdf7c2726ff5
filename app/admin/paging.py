"""Page numbers for the admin tables: which rows a page shows and links to its neighbours."""

from dataclasses import dataclass
from urllib.parse import urlencode

from fastapi import Request

from app.db import MAX_OFFSET

PER_PAGE_CHOICES = (20, 50, 100)
# The last page whose rows start within the databases' OFFSET at the largest page size.
MAX_PAGE = MAX_OFFSET // max(PER_PAGE_CHOICES) + 1


@dataclass(frozen=True)
class Pager:
    page: int  # 1-based
    per_page: int
    total: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def first_row(self) -> int:
        return min(self.offset + 1, self.total)

    @property
    def last_row(self) -> int:
        return min(self.offset + self.per_page, self.total)

    def window(self, around: int = 2) -> list[int | None]:
        """Page numbers to link: the first, the last and a few around this one; None is a gap."""
        shown = sorted({1, self.pages, *range(max(1, self.page - around), min(self.pages, self.page + around) + 1)})
        out: list[int | None] = []
        for number in shown:
            if out and number - out[-1] > 1:
                out.append(None)
            out.append(number)
        return out


def page_url(request: Request, **changes) -> str:
    """This page's address with some query parameters changed (None drops one)."""
    params = dict(request.query_params) | changes
    return request.url.path + "?" + urlencode({k: v for k, v in params.items() if v not in (None, "")})
