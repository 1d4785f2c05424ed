"""The in-memory multipart fast path gives exactly what Werkzeug's parser gives, or leaves the body to it."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pen_helpers import encode_multipart
from werkzeug.formparser import MultiPartParser

from pen_gateway.multipart import parse_form_data

LIMIT = 100_000  # above the 64 KB chunks Werkzeug reads (each is checked against it)


def _werkzeug(body: bytes, boundary: str) -> Any:
    try:
        form, files = MultiPartParser(max_form_memory_size=LIMIT, max_form_parts=20).parse(
            io.BytesIO(body), boundary.encode(), len(body))
    except Exception as exc:  # what Werkzeug refuses, the fast path must refuse too
        return type(exc).__name__
    return _flat(form, files)


def _flat(form: Any, files: Any) -> Any:
    return (list(form.items(multi=True)),
            [(name, f.filename, f.mimetype, list(f.headers.items()), f.read()) for name, f in files.items(multi=True)])


def _fast(body: bytes, boundary: str) -> Any:
    parsed = parse_form_data(body, boundary, max_field_bytes=LIMIT, max_parts=20)
    return None if parsed is None else _flat(*parsed)


def test_a_docking_station_body_takes_the_fast_path() -> None:
    page = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n\r\n"
    body, content_type = encode_multipart({"station_id": "station-01", "pen_serial": "PEN-1", "bureau": "750120"},
                                          "page.png", "image/png", page)
    boundary = content_type.split("boundary=")[1]
    fast = _fast(body, boundary)
    assert fast is not None and fast == _werkzeug(body, boundary)
    fields, files = fast
    assert fields == [("station_id", "station-01"), ("pen_serial", "PEN-1"), ("bureau", "750120")]
    assert files[0][:3] == ("file", "page.png", "image/png") and files[0][4] == page


@given(
    fields=st.lists(st.tuples(st.sampled_from(["station_id", "pen_serial", "bureau", "", "file", "é"]),
                              st.binary(max_size=40)), max_size=4),
    page=st.binary(max_size=300),
    filename=st.sampled_from(['"page.png"', '""', "page", '"a\\"b"', "\"x\"; filename*=UTF-8''%C3%A9t%C3%A9"]),
    part_type=st.sampled_from(["image/png", "", "text/plain; charset=iso-8859-1", "image/png; charset=binary"]),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.sampled_from(
        [b"\r", b"\n", b"\r\n", b"--", b" ", b"\t", b":", b"\xff", b"b"])), max_size=3),
)
@settings(max_examples=400, deadline=None)
def test_the_fast_path_agrees_with_werkzeug(fields: list[tuple[str, bytes]], page: bytes, filename: str,
                                            part_type: str, cut: int, flips: list[tuple[int, bytes]]) -> None:
    boundary = "b"  # short: the mutations below hit it often
    parts = [b'--b\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
             for name, value in fields]
    parts.append(b'--b\r\nContent-Disposition: form-data; name="file"; filename=' + filename.encode()
                 + (b"\r\nContent-Type: " + part_type.encode() if part_type else b"") + b"\r\n\r\n" + page
                 + b"\r\n--b--\r\n")
    body = b"".join(parts)
    for at, insert in flips:
        at %= len(body) + 1
        body = body[:at] + insert + body[at:]
    if cut:
        body = body[: len(body) - cut % (len(body) + 1)]
    fast = _fast(body, boundary)
    if fast is not None:
        assert fast == _werkzeug(body, boundary)


def test_bodies_it_leaves_to_werkzeug() -> None:
    ok = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n'
    assert _fast(ok, "b") == ([("x", "1")], [])
    assert _fast(b"preamble\r\n" + ok, "b") is None
    assert _fast(ok.replace(b"\r\n", b"\n"), "b") is None
    assert _fast(ok.replace(b'"x"', b'"x"\r\n continued'), "b") is None
    assert _fast(ok.replace(b"1", b"1\n--b"), "b") is None  # a boundary after a bare LF: Werkzeug's call
    assert _fast(ok.replace(b"Content-Disposition", b"Content-Type: a\r\nX"), "b") is None  # no disposition
    assert _fast(ok[:-4], "b") is None  # no closing delimiter
    assert _fast(ok.replace(b"1", b"x" * (LIMIT + 1)), "b") is None  # over the field limit: Werkzeug's 413
    assert _fast(ok, "") is None and _fast(ok, "é") is None
