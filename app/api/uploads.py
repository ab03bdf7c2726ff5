"""Multipart uploads, read only after the caller is checked and capped while they stream in.

FastAPI reads a form before it runs any dependency, so with Form/File parameters a caller without
a key could make the server take in a whole upload before its 401, and a file's cap could be
checked only once all of it had arrived. Upload routes therefore declare no body parameters: a
dependency requires an admin first, then reads the body itself and validates a form model.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, InstanceOf, ValidationError, WithJsonSchema
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.deps import RuntimeDep
from app.auth import Caller, require_admin
from app.config import Settings

TEXT_FIELD_CAP = 64 * 1024  # the longest text field, a template, is 2,000 characters

FormModel = TypeVar("FormModel", bound=BaseModel)


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    data: bytes


# A file field of a form model: documented as FastAPI documents a file, validated as an UploadedFile.
FileField = Annotated[InstanceOf[UploadedFile],
                      WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream"})]


class _FormReader:
    """python-multipart callbacks that keep the parts a form model names, each under its cap."""

    def __init__(self, names: set[str], file_cap: int):
        self.names, self.file_cap = names, file_cap
        self.values: dict[str, Any] = {}  # a repeated field keeps its last value, as FastAPI's forms do
        self._header, self._value, self._disposition = b"", b"", b""
        self._name: str | None = None
        self._filename: str | None = None
        self._chunks: list[bytes] = []  # joined once at the part's end: no growing buffer to copy over and over
        self._size = 0

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self._begin, "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data, "on_part_end": self._part_end,
        }

    def _begin(self) -> None:
        self._disposition, self._name, self._filename, self._chunks, self._size = b"", None, None, [], 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._name = name if name in self.names else None  # other parts are read past, never kept
        if b"filename" in options:
            self._filename = options[b"filename"].decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name is None:
            return
        cap = TEXT_FIELD_CAP if self._filename is None else self.file_cap
        if self._size + end - start > cap:
            kind = "field" if self._filename is None else "file"
            raise HTTPException(413, detail=f"{self._name}: {kind} is larger than {cap} bytes")
        self._chunks.append(data[start:end])
        self._size += end - start

    def _part_end(self) -> None:
        if self._name is None:
            return
        data = b"".join(self._chunks)
        if self._filename is not None:
            self.values[self._name] = UploadedFile(self._filename, data)
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(422, detail=f"{self._name}: not UTF-8 text") from None
        if text:  # a blank field means "not given", as in FastAPI's forms: the default applies
            self.values[self._name] = text
        else:
            self.values.pop(self._name, None)


async def read_form(request: Request, names: set[str], file_cap: int) -> dict[str, Any]:
    """The named fields of a multipart body, refusing a file with 413 as soon as it passes `file_cap`."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise HTTPException(415, detail="send the upload as multipart/form-data")
    reader = _FormReader(names, file_cap)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            # Chunks already received come without a pause: let others' requests in between them.
            await asyncio.sleep(0)
        parser.finalize()
    except FormParserError as exc:
        raise HTTPException(400, detail=f"malformed multipart/form-data body ({exc})") from None
    return reader.values


def admin_form(model: type[FormModel], file_cap: Callable[[Settings], int]) -> Callable:
    """A dependency giving `model` validated from the body, read only once an admin is calling."""

    async def dependency(request: Request, runtime: RuntimeDep, _: Annotated[Caller, Depends(require_admin)]) -> FormModel:
        values = await read_form(request, set(model.model_fields), file_cap(runtime.settings))
        try:
            return model.model_validate(values)
        except ValidationError as exc:  # shaped as FastAPI's own form errors; files are not echoed
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False, include_input=False)]
            ) from None

    return dependency


def openapi_form(model: type[BaseModel]) -> dict:
    """The route's request body for the docs, which cannot see a form read by a dependency. A form
    field cannot be null, only left out (then its default applies): optional fields are documented
    as their type alone."""
    schema = model.model_json_schema()
    for field in schema["properties"].values():
        options = [option for option in field.get("anyOf", []) if option != {"type": "null"}]
        if len(options) == 1:
            del field["anyOf"]
            field.update(options[0])
        if field.get("default", 0) is None:
            del field["default"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
