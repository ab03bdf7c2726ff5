"""Incremental detokenization: each new token costs a decode of a few tokens, not of the row.

Decoding a token alone can differ from decoding it in context (leading-space rules, characters
split over several byte tokens), so, as vLLM and TGI do, we decode a short window that starts a
few tokens back both with and without the new tokens and append the difference. Text is emitted
only once it no longer ends in a partial character (U+FFFD); `finish` flushes whatever is left.
The result equals decoding all the tokens at once.
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is already in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def finish(self) -> str:
        """The text of tokens held back (a partial character stays as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        delta = self._decode(self.ids[self._prefix :])[len(before) :]
        self.text += delta
        self._prefix = self._read = len(self.ids)
        return delta
