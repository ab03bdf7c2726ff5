"""Uploads (POST /adapters, POST /train-jobs): the caller is checked before the body is read, and a
file is refused (413 naming its cap) as soon as it passes the cap, over real HTTP."""

import json
import socket

import pytest

from app import auth, jobs, registry

CAP = 1024 * 1024  # per-file cap the tests run with; the whole body may be 2 files + 64 kB
BOUNDARY = "softserve-test-boundary"
FILE_FIELD = {"/adapters": "weights", "/train-jobs": "file"}


def part_head(field: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def request_head(path: str, port: int, length: int | None, key: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(data: bytes, size: int = 64 * 1024) -> bytes:
    """`data` as HTTP/1.1 chunks, without the final empty chunk: the body has not ended."""
    return b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in
                    (data[i : i + size] for i in range(0, len(data), size)))


def send_part_then_read(port: int, head: bytes, body_start: bytes, timeout: float = 10) -> tuple[int, dict] | None:
    """Send a request head and only the start of its body, then wait for the response.

    Returns (status, JSON body), or None when the server kept waiting for the rest of the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = b""
        try:
            sock.sendall(head + body_start)
            while data := sock.recv(65536):
                received += data
                head_end = received.find(b"\r\n\r\n")
                if head_end >= 0:
                    headers = received[:head_end].decode("latin-1").lower()
                    length = int(headers.split("content-length:")[1].split("\r\n")[0])
                    if len(received) >= head_end + 4 + length:
                        return int(headers.split(" ")[1]), json.loads(received[head_end + 4 : head_end + 4 + length])
        except TimeoutError:
            pass
    return None


def stored(server) -> tuple[int, int]:
    """(adapters, jobs) in the registry: a refused upload leaves neither."""
    with server.runtime.sessions() as session:
        return registry.list_adapters(session, limit=1, offset=0)[1], jobs.list_jobs(session, limit=1, offset=0)[1]


@pytest.fixture
def keyed_server(make_live_server, tiny_base):
    server = make_live_server(tiny_base)
    with server.runtime.sessions() as session:
        server.keys = {"none": None, "inference": auth.create_key(session, "inference", "app")[1]}
        auth.create_key(session, "admin", "ops")
    return server


@pytest.mark.parametrize("path", ["/adapters", "/train-jobs"])
@pytest.mark.parametrize("who, status", [("none", 401), ("inference", 403)])
def test_a_100_mb_upload_by_a_non_admin_is_refused_before_its_body_is_read(keyed_server, path, who, status):
    """Only 256 kB of the 100 MB body is ever sent: the refusal must not wait for the rest."""
    head = request_head(path, keyed_server.port, 100 * 1024 * 1024, keyed_server.keys[who])
    answer = send_part_then_read(keyed_server.port, head, part_head(FILE_FIELD[path], "big.bin") + bytes(256 * 1024))
    assert answer is not None, "the server waited for the whole body before refusing the caller"
    assert answer[0] == status, answer
    assert stored(keyed_server) == (0, 0)


@pytest.mark.parametrize("path", ["/adapters", "/train-jobs"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_file_over_its_cap_gets_413_as_soon_as_it_passes_the_cap(make_live_server, tiny_base, path, framing):
    """The body declares 2 MiB (within the whole-body cap) or is chunked; 1.5 MiB of one file is sent."""
    server = make_live_server(tiny_base, max_adapter_upload_bytes=CAP, max_dataset_bytes=CAP)
    field = FILE_FIELD[path]
    body_start = part_head("name", None) + b"big\r\n" + part_head(field, "big.bin") + bytes(CAP * 3 // 2)
    if framing == "chunked":
        head, body_start = request_head(path, server.port, None), chunked(body_start)
    else:
        head = request_head(path, server.port, 2 * CAP)
    answer = send_part_then_read(server.port, head, body_start)
    assert answer is not None, "the server read on past the file's cap"
    assert answer == (413, {"detail": f"{field}: file is larger than {CAP} bytes"})
    assert stored(server) == (0, 0)


@pytest.mark.parametrize(
    "path, body, limit",
    [
        ("/generate", [b'{"prompt": "', b"a" * CAP, b"a" * CAP, b'"}'], CAP),
        # a form field the route does not know is read past, never kept, but still counts
        ("/adapters", [part_head("junk", "junk.bin"), bytes(CAP), bytes(CAP), bytes(CAP)], 2 * CAP + 64 * 1024),
    ],
)
def test_a_chunked_body_over_the_whole_body_cap_gets_413_not_400(make_client, tiny_base, path, body, limit):
    client = make_client(tiny_base, max_adapter_upload_bytes=CAP)
    content_type = "application/json" if path == "/generate" else f"multipart/form-data; boundary={BOUNDARY}"
    response = client.post(path, content=iter(body), headers={"Content-Type": content_type})  # no Content-Length
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == f"request body is larger than the {limit}-byte limit"
    assert client.get("/adapters").json()["total"] == 0


@pytest.mark.parametrize("path", ["/adapters", "/train-jobs"])
def test_an_upload_that_is_not_multipart_gets_415(make_client, tiny_base, path):
    response = make_client(tiny_base).post(path, json={"name": "x"})
    assert response.status_code == 415
    assert response.json()["detail"] == "send the upload as multipart/form-data"


def test_a_text_field_over_its_cap_gets_413_naming_it(make_client, tiny_base):
    response = make_client(tiny_base).post("/train-jobs", data={"template": "{input}" * 10_000},
                                           files={"file": ("t.jsonl", b'{"input": "a", "output": "b"}\n')})
    assert response.status_code == 413
    assert response.json()["detail"] == "template: field is larger than 65536 bytes"


def test_the_upload_forms_are_still_documented(make_client, tiny_base):
    """The forms are read by a dependency now, out of FastAPI's sight: the docs must still show them."""
    spec = make_client(tiny_base).get("/openapi.json").json()

    def resolve(schema: dict) -> dict:
        return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema

    for path, files, required, fields in [
        ("/adapters", {"config", "weights", "archive"}, ["name"], {"name"}),
        ("/train-jobs", {"file", "validation_file"}, ["file"], {"name", "template", "max_steps", "init"}),
    ]:
        schema = resolve(spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"])
        assert set(schema["properties"]) >= files | fields and schema["required"] == required, path
        for name in files:
            options = schema["properties"][name].get("anyOf", [schema["properties"][name]])
            assert any(option.get("contentMediaType") == "application/octet-stream" for option in options), (path, name)
