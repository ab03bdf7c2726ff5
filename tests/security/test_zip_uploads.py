"""Hostile adapter zips: bombs, corrupt or encrypted members, odd compression, too many members.

Each must get a 422 that says what is wrong, cost little memory, and store nothing."""

import asyncio
import io
import struct
import tracemalloc
import zipfile

import pytest

from app import adapter_files
from app.adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError
from app.storage import ADAPTERS
from tests.conftest import adapter_file_bytes, random_soft_prompt

CAP = 1024 * 1024  # the per-file upload cap the tests run with


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base, max_adapter_upload_bytes=CAP)


def adapter_zip(tiny_base, weights: bytes | None = None, extra: int = 0) -> bytes:
    config, real_weights = adapter_file_bytes(random_soft_prompt(tiny_base, 3, seed=1))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CONFIG_NAME, config)
        archive.writestr(WEIGHTS_NAME, real_weights if weights is None else weights)
        for i in range(extra):
            archive.writestr(f"junk/{i}", b"")
    return buffer.getvalue()


def patch_member(data: bytes, name: str, *, flags: int | None = None, method: int | None = None,
                 crc: int | None = None, size: int | None = None) -> bytes:
    """Rewrite fields of a member's local and central headers, as a hostile zip would carry them."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        local = archive.getinfo(name).header_offset
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name.encode():  # walk the central directory
        central = data.index(b"PK\x01\x02", central + 1)
    # (field, struct format, offset in the local header; the central header has it 2 bytes later)
    for value, fmt, offset in ((flags, "<H", 6), (method, "<H", 8), (crc, "<I", 14), (size, "<I", 22)):
        if value is not None:
            struct.pack_into(fmt, out, local + offset, value)
            struct.pack_into(fmt, out, central + offset + 2, value)
    return bytes(out)


def corrupt_deflate(data: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        local = archive.getinfo(name).header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    start = local + 30 + name_len + extra_len
    return data[:start] + b"\xff" + data[start + 1 :]  # a deflate block of the reserved type 3


def post_archive(client, data: bytes):
    return client.post("/adapters", data={"name": "x"}, files={"archive": ("a.zip", data)})


def stored_nothing(client) -> bool:
    storage = client.app.state.runtime.storage
    return client.get("/adapters").json()["total"] == 0 and storage.keys(ADAPTERS) == []


def test_a_member_inflating_far_past_its_declared_size_is_refused_without_inflating_it(client, tiny_base):
    """48 MiB of zeros (48 kB deflated) declared as 1,000 bytes: refused, and never inflated whole."""
    bomb = patch_member(adapter_zip(tiny_base, weights=bytes(48 * 1024 * 1024)), WEIGHTS_NAME, size=1000)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        response = post_archive(client, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 422, response.text
    assert f"archive: {WEIGHTS_NAME} is corrupt" in response.json()["detail"]
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB while refusing a 48 kB upload"
    assert stored_nothing(client)


def test_a_member_declared_over_the_cap_is_refused_unread(client, tiny_base):
    response = post_archive(client, adapter_zip(tiny_base, weights=bytes(CAP + 1)))
    assert response.status_code == 422
    assert f"archive: {WEIGHTS_NAME} is larger than {CAP} bytes" in response.json()["detail"]
    assert stored_nothing(client)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad_crc", f"archive: {CONFIG_NAME} is corrupt (Bad CRC-32"),
        ("corrupt_deflate", f"archive: {CONFIG_NAME} is corrupt (Error -3 while decompressing data: invalid block type)"),
        ("encrypted", f"archive: {CONFIG_NAME} is encrypted; upload an unencrypted zip"),
        ("unknown_method", f"archive: {CONFIG_NAME} uses compression method 99; use deflate or none"),
        ("lzma", f"archive: {CONFIG_NAME} uses compression method 14; use deflate or none"),
    ],
)
def test_broken_members_get_422_naming_the_problem(client, tiny_base, case, expected):
    data = adapter_zip(tiny_base)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        crc = archive.getinfo(CONFIG_NAME).CRC
    if case == "bad_crc":
        data = patch_member(data, CONFIG_NAME, crc=crc ^ 0xFFFF)
    elif case == "corrupt_deflate":
        data = corrupt_deflate(data, CONFIG_NAME)
    elif case == "encrypted":
        data = patch_member(data, CONFIG_NAME, flags=0x1)
    elif case == "unknown_method":
        data = patch_member(data, CONFIG_NAME, method=99)
    elif case == "lzma":  # zipfile inflates LZMA and bzip2 with no output bound: refused outright
        data = patch_member(data, CONFIG_NAME, method=zipfile.ZIP_LZMA)
    response = post_archive(client, data)
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]
    assert stored_nothing(client)


def test_a_zip_with_thousands_of_members_is_refused_before_they_are_listed(client, tiny_base, monkeypatch):
    data = adapter_zip(tiny_base, extra=5000)
    assert len(data) < CAP
    listed = []

    class CountingInfo(zipfile.ZipInfo):
        def __init__(self, *args, **kwargs):
            listed.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipInfo", CountingInfo)
    response = post_archive(client, data)
    assert response.status_code == 422, response.text
    assert "archive: lists 5002 members" in response.json()["detail"]
    assert "at most 100" in response.json()["detail"]
    assert not listed  # zipfile never built an entry per member
    assert stored_nothing(client)


def test_a_zip64_archive_is_refused(client, tiny_base, monkeypatch):
    """Its end records may list any number of members, whatever the classic record says."""
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # zipfile writes zip64 end records past it
        data = adapter_zip(tiny_base)
    assert b"PK\x06\x06" in data
    response = post_archive(client, data)
    assert response.status_code == 422
    assert response.json()["detail"] == "archive: zip64 archives are not supported"


def test_a_zip_of_100_members_is_still_accepted(client, tiny_base):
    response = post_archive(client, adapter_zip(tiny_base, extra=98))
    assert response.status_code == 201, response.text


def test_zips_are_read_off_the_event_loop(client, tiny_base, monkeypatch):
    data = adapter_zip(tiny_base)
    where = []
    real = zipfile.ZipFile

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", spy)
    assert post_archive(client, data).status_code == 201
    assert where == ["worker thread"]


def test_every_single_byte_corruption_is_a_format_error_or_a_valid_read(tiny_base):
    """Whatever one damaged byte does to a zip, reading it raises AdapterFormatError or succeeds."""
    data = adapter_zip(tiny_base)
    unexpected = []
    for position in range(len(data)):
        for value in (0x00, 0xFF, data[position] ^ 0x80):
            damaged = data[:position] + bytes([value]) + data[position + 1 :]
            try:
                adapter_files.split_upload(None, None, damaged, CAP)
            except AdapterFormatError:
                pass
            except Exception as exc:  # noqa: BLE001 - the point is to catch anything else
                unexpected.append(f"byte {position} = {value:#x}: {type(exc).__name__}: {exc}")
    assert not unexpected, unexpected[:10]
