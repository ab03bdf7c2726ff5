"""Cut a row's growing text into pieces that are safe to send while it is still generating.

Held back until the next token: a trailing replacement character (half of a multi-byte
character) and any ending that could be the start of a stop string, which would be cut.
"""

from collections.abc import Sequence


class TextDeltas:
    def __init__(self, stop: Sequence[str] = ()):
        self.stop = stop
        self.sent = 0  # characters of the text already sent

    def next(self, text: str, finished: bool) -> str:
        end = len(text) if finished else self._safe_end(text)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0
        )
        return end - held
