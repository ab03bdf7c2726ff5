"""Training datasets: parse and validate uploads (JSONL or CSV of input/output pairs).

Every problem is reported with its line number, so a user can fix the file in one go.
Stored datasets are normalised JSONL written by the server.
"""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

ALIASES = {"input": ("input", "prompt"), "output": ("output", "completion")}
MAX_ERRORS_REPORTED = 20


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


def _check_record(record, line: int, errors: list) -> Example | None:
    if not isinstance(record, dict):
        errors.append((line, "expected a JSON object with input and output"))
        return None
    values = {}
    for key in ("input", "output"):
        value = _pick(record, key)
        if value is None:
            errors.append((line, f"missing field {key!r} (or {ALIASES[key][1]!r})"))
            return None
        if not isinstance(value, str) or not value.strip():
            errors.append((line, f"field {key!r} must be a non-empty string"))
            return None
        values[key] = value
    return Example(values["input"], values["output"])


def _records(text: str, is_csv: bool):
    """Yield (line number, record or None, parse error or None)."""
    if is_csv:
        reader = csv.DictReader(io.StringIO(text))
        missing = [k for k in ("input", "output") if not any(a in (reader.fieldnames or []) for a in ALIASES[k])]
        if missing:
            yield 1, None, f"CSV header must have columns input and output (or prompt and completion), missing {missing}"
            return
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}, None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"not valid JSON ({exc.msg})"


def parse_dataset(data: bytes, field: str, filename: str | None, max_examples: int) -> list[Example]:
    """Parse a JSONL or CSV upload; raise DatasetError listing the offending lines."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(field, [(0, f"file is not UTF-8 (byte {exc.start})")], 1) from None
    is_csv = (filename or "").lower().endswith(".csv")
    errors: list[tuple[int, str]] = []
    examples: list[Example] = []
    for line, record, problem in _records(text, is_csv):
        if problem:
            errors.append((line, problem))
            continue
        example = _check_record(record, line, errors)
        if example:
            examples.append(example)
    if errors:
        raise DatasetError(field, errors[:MAX_ERRORS_REPORTED], len(errors))
    if not examples:
        raise DatasetError(field, [(0, "file has no examples")], 1)
    if len(examples) > max_examples:
        raise DatasetError(field, [(0, f"{len(examples)} examples, the limit is {max_examples}")], 1)
    return examples


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for example in examples:
            out.write(json.dumps({"input": example.input, "output": example.output}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as lines:
        return [Example(**json.loads(line)) for line in lines if line.strip()]
