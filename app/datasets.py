"""Training datasets: parse and validate uploads: JSONL or CSV of input/output pairs, or JSONL of
chats (`{"messages": [...]}` lines, OpenAI's fine-tuning format). A file holds one format only.

Every problem is reported with its line number, so a user can fix many in one go; reading stops at
the MAX_ERRORS_REPORTED-th problem, or when it has taken `time_budget_s`, so that a file of
nothing but bad or blank lines costs little. Stored datasets are normalised JSONL written by the
server (to_jsonl), kept in shared storage.
"""

import asyncio
import csv
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.chat_template import ROLES, canonical_role, text_of
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


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str
    weight: int = 1  # an assistant turn with weight 0 is context, not learnt (as OpenAI's format has it)


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[ChatMessage, ...]

    @property
    def trained(self) -> list[bool]:
        """For each message, whether it is an assistant turn to learn."""
        return [m.role == "assistant" and m.weight == 1 for m in self.messages]

    @property
    def last_trained(self) -> int:
        return max(k for k, learn in enumerate(self.trained) if learn)

    @property
    def output(self) -> str:
        """The last assistant turn learnt: what the chat's reply should be (labels, accuracy)."""
        return self.messages[self.last_trained].content


Dataset = list[Example] | list[ChatExample]
Format = Literal["completion", "chat"]


class DatasetError(ValueError):
    """The upload is not a valid dataset. `errors` lists (line number, message); `stopped` says why
    reading stopped before the end of the file, if it did (the file may hold more errors)."""

    def __init__(self, field: str, errors: list[tuple[int, str]], stopped: str | None = None):
        self.field = field
        self.errors = errors
        self.stopped = stopped
        shown = "; ".join(f"line {line}: {message}" if line else message for line, message in errors)
        super().__init__(f"{field}: {shown}" + (f" ({stopped})" if stopped else ""))



def render(template: str, text: str) -> str:
    """Lay an input out with a template such as "Review: {input}\nSentiment:"."""
    return template.replace("{input}", text)


def _pick(record: dict, key: str):
    for name in ALIASES[key]:
        if name in record:
            return record[name]
    return None


def _check_text(value, what: str) -> str | None:
    """What is wrong with a text value, if anything."""
    if not isinstance(value, str):
        return f"{what} must be a string"
    if SURROGATE.search(value):  # from a "\\ud800" escape: not text, cannot be stored as UTF-8
        return f"{what} is not valid Unicode: it holds an unpaired surrogate"
    return None


def _check_content(content, what: str) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text"} parts; raises
    ValueError saying what is wrong."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"} for p in content):
            raise ValueError(f"{what}: only text parts are supported, {{\"type\": \"text\", \"text\": ...}}")
        texts = [p["text"] for p in content]
    else:
        texts = [content]
    problem = next(filter(None, (_check_text(text, what) for text in texts)), None)
    if problem:
        raise ValueError(problem)
    return text_of(texts)


def _check_message(message, number: int) -> ChatMessage:
    """One message of a chat; raises ValueError saying what is wrong."""
    what = f"message {number}"
    if not isinstance(message, dict):
        raise ValueError(f"{what} must be an object with role and content")
    extra = sorted(set(message) - {"role", "content", "weight"})
    if extra:
        raise ValueError(f"{what}: field {extra[0]!r} is not supported (role, content, and weight on assistant messages)")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{what}: role {role!r} is not supported ({', '.join(ROLES)})")
    if "content" not in message:
        raise ValueError(f"{what}: missing field 'content'")
    content = _check_content(message["content"], f"{what} content")
    weight = message.get("weight", 1)
    if "weight" in message and role != "assistant":
        raise ValueError(f"{what}: weight is for assistant messages only")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f"{what}: weight must be 0 or 1")
    if role == "assistant" and weight == 1 and not content.strip():
        raise ValueError(f"{what}: an assistant message to learn must have non-empty content")
    return ChatMessage(canonical_role(role), content, weight)


def _check_chat(record: dict) -> ChatExample | str:
    """The chat, or what is wrong with the record."""
    extra = sorted(set(record) - {"messages"})
    if extra:
        return f"field {extra[0]!r} is not supported in a chat example (only 'messages')"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of messages"
    try:
        chat = ChatExample(tuple(_check_message(m, n) for n, m in enumerate(messages, start=1)))
    except ValueError as exc:
        return str(exc)
    if not any(chat.trained):
        return "a chat example needs an assistant message to learn from (one without weight 0)"
    return chat


def _check_record(record) -> Example | ChatExample | str:
    """The example, or what is wrong with the record."""
    if not isinstance(record, dict):
        return "expected a JSON object with input and output, or with messages"
    if "messages" in record:
        return _check_chat(record)
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


BLANK = object()  # a blank line's record: skipped, but its reading is counted against the time budget


def _records(text: str, is_csv: bool):
    """Yield (line number, record or None or BLANK, parse error or None)."""
    if is_csv:
        reader = csv.reader(io.StringIO(text))
        try:
            header = next(reader, [])
            missing = [k for k in ("input", "output") if not any(a in header for a in ALIASES[k])]
            if missing:
                yield 1, None, f"CSV header must have columns input and output (or prompt and completion), missing {missing}"
                return
            for row in reader:  # a short row lacks the last columns; a long one's extra fields are dropped
                yield reader.line_num, dict(zip(header, row)) if row else BLANK, None
        except csv.Error as exc:  # such as a field over the csv module's 131,072-character limit
            yield reader.line_num, None, f"not valid CSV ({exc})"
        return
    for number, line in enumerate(_lines(text), start=1):
        yield number, *(_parse_json_line(line) if line.strip() else (BLANK, None))


def _kind(example: Example | ChatExample) -> str:
    return "chat" if isinstance(example, ChatExample) else "input/output"


def parse_dataset(data: bytes, field: str, filename: str | None, max_examples: int,
                  time_budget_s: float = 60.0) -> Dataset:
    """Parse a JSONL or CSV upload; raise DatasetError listing the offending lines. Its first
    example sets the file's format; an example of the other format is an error."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(field, [(0, f"file is not UTF-8 (byte {exc.start})")]) from None
    is_csv = (filename or "").lower().endswith(".csv")
    deadline = time.monotonic() + time_budget_s
    errors: list[tuple[int, str]] = []
    examples: list = []
    first_line = 0
    for count, (line, record, problem) in enumerate(_records(text, is_csv), start=1):
        if count % 4096 == 0 and time.monotonic() > deadline:
            errors.append((line, f"reading the file took over {time_budget_s:g} s; stopped reading here"))
            break
        if record is BLANK:
            continue
        checked = problem or _check_record(record)
        if examples and not isinstance(checked, str) and type(checked) is not type(examples[0]):
            kind = _kind(checked)
            checked = (f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} example in a file of {_kind(examples[0])} "
                       f"examples (from line {first_line}): a file holds one format")
        if isinstance(checked, str):
            errors.append((line, checked))
            if len(errors) == MAX_ERRORS_REPORTED:
                raise DatasetError(field, errors, f"stopped reading at the {MAX_ERRORS_REPORTED}th problem")
        elif len(examples) == max_examples:  # one too many: the file must be cut down, so read no further
            errors.append((line, f"too many examples, the limit is {max_examples}; stopped reading here"))
            break
        else:
            first_line = first_line or line
            examples.append(checked)
    if errors:
        raise DatasetError(field, errors)
    if not examples:
        raise DatasetError(field, [(0, "file has no examples")])
    return examples


def normalised(data: bytes, field: str, filename: str | None, max_examples: int, time_budget_s: float) -> bytes:
    """The upload checked, and written as to_jsonl stores datasets (an example a line): an
    {"input", "output"} object, or a {"messages": [...]} one (roles system, user, assistant;
    content a string; "weight": 0 on assistant turns that are not learnt)."""
    return to_jsonl(parse_dataset(data, field, filename, max_examples, time_budget_s))


async def normalise_elsewhere(data: bytes, field: str, filename: str | None, max_examples: int,
                              time_budget_s: float) -> bytes:
    """`normalised`, in a process of its own (`python -m app.datasets`, which imports nothing
    heavy): reading 50 MiB takes seconds of CPU, which in a thread would hold the interpreter lock
    the event loop needs to answer anyone else. The data goes both ways through files, written and
    read in worker threads. Raises DatasetError as `normalised` does."""
    with tempfile.TemporaryDirectory(prefix="softserve-dataset-") as work:
        upload, result = Path(work) / "upload", Path(work) / "normalised.jsonl"
        await asyncio.to_thread(upload.write_bytes, data)
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.datasets", str(upload), str(result), field, filename or "", str(max_examples),
            str(time_budget_s), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        refusal, err = await reader.communicate()
        if reader.returncode == _REFUSED:
            why = json.loads(refusal)
            raise DatasetError(why["field"], [tuple(error) for error in why["errors"]], why["stopped"])
        if reader.returncode != 0:
            raise RuntimeError(f"reading the dataset failed ({reader.returncode}): {err.decode(errors='replace')[-2000:]}")
        return await asyncio.to_thread(result.read_bytes)


_REFUSED = 3  # the reading process's exit status for a dataset it refused; its output says why


def _normalise_file() -> None:
    """`python -m app.datasets UPLOAD RESULT FIELD FILENAME MAX_EXAMPLES BUDGET_S`: RESULT gets the
    upload's normalised JSONL; or the exit status is _REFUSED and stdout says why."""
    upload, result, field, filename, max_examples, budget = sys.argv[1:7]
    try:
        normalised_data = normalised(Path(upload).read_bytes(), field, filename or None, int(max_examples), float(budget))
    except DatasetError as exc:
        sys.stdout.write(json.dumps({"field": exc.field, "errors": exc.errors, "stopped": exc.stopped}))
        sys.exit(_REFUSED)
    Path(result).write_bytes(normalised_data)


def _stored(example: Example | ChatExample) -> dict:
    if isinstance(example, Example):
        return {"input": example.input, "output": example.output}
    return {"messages": [{"role": m.role, "content": m.content} | ({} if m.weight else {"weight": 0})
                         for m in example.messages]}


def to_jsonl(examples: Dataset) -> bytes:
    """The normalised form datasets are stored in."""
    return "".join(json.dumps(_stored(e), ensure_ascii=False) + "\n" for e in examples).encode()


def _example(record: dict) -> Example | ChatExample:
    if "messages" in record:
        return ChatExample(tuple(ChatMessage(**m) for m in record["messages"]))
    return Example(**record)


def from_jsonl(data: bytes) -> Dataset:
    """Examples stored by to_jsonl (already validated), or a bundled sample file's."""
    return [_example(json.loads(line)) for line in data.decode("utf-8").split("\n") if line.strip()]


def dataset_format(data: bytes) -> Format:
    """The format of a stored (normalised) dataset, from its first line: the whole file has it."""
    return "chat" if data.startswith(b'{"messages"') else "completion"


def read_jsonl(path: Path) -> Dataset:
    return from_jsonl(path.read_bytes())


if __name__ == "__main__":
    _normalise_file()
