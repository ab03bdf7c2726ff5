"""Training datasets: parse and validate uploads (JSONL or CSV of input/output pairs).

Every problem is reported with its line number, so a user can fix the file in one go.
Stored datasets are normalised JSONL written by the server (to_jsonl), kept in shared storage.
"""

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from app.schemas import SURROGATE

ALIASES = {"input": ("input", "prompt"), "output": ("output", "completion")}
MAX_ERRORS_REPORTED = 20
# Longer lines are refused unparsed: twice the csv module's field limit (131,072), room for an
# input and an output far beyond what training's max_length (8,192 tokens) can use.
MAX_LINE_CHARS = 262_144


@dataclass(frozen=True)
class Example:
    input: str
    output: str


class DatasetError(ValueError):
    """The upload is not a valid dataset. `errors` lists (line number, message), first ones only."""

    def __init__(self, field: str, errors: list[tuple[int, str]], total: int):
        self.field = field
        self.errors = errors
        self.total = total
        shown = "; ".join(f"line {line}: {message}" if line else message for line, message in errors)
        more = f" (and {total - len(errors)} more)" if total > len(errors) else ""
        super().__init__(f"{field}: {shown}{more}")


def render(template: str, text: str) -> str:
    """Lay an input out with a template such as "Review: {input}\nSentiment:"."""
    return template.replace("{input}", text)


def _pick(record: dict, key: str):
    for name in ALIASES[key]:
        if name in record:
            return record[name]
    return None


def _check_record(record) -> Example | str:
    """The example, or what is wrong with the record."""
    if not isinstance(record, dict):
        return "expected a JSON object with input and output"
    values = {}
    for key in ("input", "output"):
        value = _pick(record, key)
        if value is None:
            return f"missing field {key!r} (or {ALIASES[key][1]!r})"
        if not isinstance(value, str) or not value.strip():
            return f"field {key!r} must be a non-empty string"
        if SURROGATE.search(value):  # from a "\\ud800" escape: not text, cannot be stored as UTF-8
            return f"field {key!r} is not valid Unicode: it holds an unpaired surrogate"
        values[key] = value
    return Example(values["input"], values["output"])


def _lines(text: str):
    """The text's lines, one at a time. Only \n ends a line (a \r before it is JSON whitespace):
    str.splitlines() also splits at U+2028, U+2029 and U+0085, which JSON strings may hold."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end == -1 else end
        yield text[start:end]
        start = end + 1


def _parse_json_line(line: str) -> tuple[object, str | None]:
    """(record, None), or (None, what is wrong)."""
    if len(line) > MAX_LINE_CHARS:
        return None, f"line is longer than {MAX_LINE_CHARS} characters"
    try:
        return json.loads(line), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError:  # json's one other error: an integer too long to convert to int
        return None, f"a number with more than {sys.get_int_max_str_digits()} digits"


def _records(text: str, is_csv: bool):
    """Yield (line number, record or None, parse error or None)."""
    if is_csv:
        reader = csv.DictReader(io.StringIO(text))
        try:
            missing = [k for k in ("input", "output") if not any(a in (reader.fieldnames or []) for a in ALIASES[k])]
            if missing:
                yield 1, None, f"CSV header must have columns input and output (or prompt and completion), missing {missing}"
                return
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}, None
        except csv.Error as exc:  # such as a field over the csv module's 131,072-character limit
            # DictReader's own line_num is set only after a row succeeds; its reader's is current.
            yield reader.reader.line_num, None, f"not valid CSV ({exc})"
        return
    for number, line in enumerate(_lines(text), start=1):
        if line.strip():
            yield number, *_parse_json_line(line)


def parse_dataset(data: bytes, field: str, filename: str | None, max_examples: int) -> list[Example]:
    """Parse a JSONL or CSV upload; raise DatasetError listing the offending lines."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(field, [(0, f"file is not UTF-8 (byte {exc.start})")], 1) from None
    is_csv = (filename or "").lower().endswith(".csv")
    errors: list[tuple[int, str]] = []  # the first MAX_ERRORS_REPORTED; the rest are only counted
    error_count = 0
    examples: list[Example] = []
    for line, record, problem in _records(text, is_csv):
        checked = problem or _check_record(record)
        if isinstance(checked, str):
            error_count += 1
            if len(errors) < MAX_ERRORS_REPORTED:
                errors.append((line, checked))
        elif len(examples) == max_examples:  # one too many: the file must be cut down, so read no further
            errors.append((line, f"too many examples, the limit is {max_examples}; stopped reading here"))
            error_count += 1
            break
        else:
            examples.append(checked)
    if errors:
        raise DatasetError(field, errors, error_count)
    if not examples:
        raise DatasetError(field, [(0, "file has no examples")], 1)
    return examples


def to_jsonl(examples: list[Example]) -> bytes:
    """The normalised form datasets are stored in."""
    return "".join(json.dumps({"input": e.input, "output": e.output}, ensure_ascii=False) + "\n" for e in examples).encode()


def from_jsonl(data: bytes) -> list[Example]:
    """Examples stored by to_jsonl (already validated), or a bundled sample file's."""
    return [Example(**json.loads(line)) for line in data.decode("utf-8").split("\n") if line.strip()]


def read_jsonl(path: Path) -> list[Example]:
    return from_jsonl(path.read_bytes())
