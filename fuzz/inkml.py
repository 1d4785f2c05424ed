"""Fuzz target: the InkML decoder (`pen_gateway.decode`, `application/inkml+xml`).

Invariant (`check_inkml` raises `AssertionError` when it breaks): `decode_upload(data, type)` either
raises `DecodeError` (a code, a message, 415 or 422) or returns an ink page whose strokes are
(N, 2) float64 arrays of finite millimetres, N >= 1; `probe_upload`, the upload-time check, agrees
with it (same error code, or the same stroke and point counts). Any other exception is a crash.

Input layout: byte 0 picks the mode. Even: the rest (after the declared-type byte) is the file
as is, mutated byte by byte by libFuzzer from the seeds. Odd: structure-aware, a valid-ish
InkML document is built from the bytes: XML declaration and encoding, namespace, definitions
(traceFormat, context, traceFormatRef), channels and their units, traceGroups and contextRefs,
and trace points whose numbers, qualifiers (! ' ") and separators are mutated.

Run: `.venv/bin/python fuzz/run.py --target inkml --seconds 600`.
"""

from __future__ import annotations

import sys

import numpy as np

from fuzz._harness import ByteReader, fuzz_main, instrumenting

with instrumenting(__name__ == "__main__", ["pen_gateway.decode", "defusedxml", "xml.etree"]):
    from pen_gateway.decode import INKML, DecodeError, decode_upload, probe_upload

DECLARED = (INKML, "application/xml", "text/xml", None, "application/octet-stream", "image/png",
            "application/inkml+xml; charset=utf-8", "text/plain", "APPLICATION/INKML+XML")

ENCODINGS = ("UTF-8", "utf-8", "UTF-16", "ISO-8859-1", "us-ascii", "latin-1", "cp1252", "UTF-32", "utf-7",
             "shift_jis", "cp932", "euc-jp", "foo", "rot13", "hex", "idna", "cp037", "utf_8_sig", "mbcs", "")
NAMESPACES = ('xmlns="http://www.w3.org/2003/InkML"', "", 'xmlns="http://example.org/other"',
              'xmlns="http://www.w3.org/2003/InkML" xmlns:x="urn:x"')
CHANNEL_NAMES = ("X", "Y", "T", "F", "P", "x", "", "X ", "OA")
UNITS = ("mm", "cm", "in", "m", None, "", "MM", " In ", "km", "dev", "pt", "mm\x85", "1/mm")
NUMBERS = ("0", "1", "-1", "10.5", ".5", "5.", "+3", "1e3", "1E-3", "1e308", "1e309", "-1e400", "1e", "--1",
           "1.2.3", "nan", "inf", "0x10", "١٢", "9" * 400, "1" + "0" * 320, "-0", "4.9e-324", "1_0", "")
QUALIFIERS = ("", "", "", "!", "'", '"', "''", "!'")
SEPARATORS = (" ", " ", "\t", "\n", "  ", "", "\r\n", "\u00a0", ";")
POINT_SEPARATORS = (",", ",", ", ", ",\n", ",,", "", " , ")
REFS = ("#ctx", "ctx", "#tf", "#nope", "#", "", "#ctx2")
EXTRAS = ("<!-- a comment -->", "<![CDATA[1 2, 3 4]]>", "&#x31; &#50;", "&amp;", "&lt;", "<?pi data?>",
          '<!DOCTYPE ink [<!ENTITY e "1 2">]>', "&e;", "<annotation>é</annotation>", "\x00", "<trace/>",
          "</trace>", "<traceGroup>", "\ufeff")


def raw_input(data: bytes, declared: int = 0) -> bytes:
    """The fuzz input that feeds `data` as is (for the seed corpus and the regression tests)."""
    return bytes([0, declared]) + data


def _channels(reader: ByteReader) -> str:
    out = []
    for _ in range(reader.int_in(0, 4)):
        name = reader.pick(CHANNEL_NAMES)
        units = reader.pick(UNITS)
        unit_attr = "" if units is None else f' units="{units}"'
        out.append(f'<channel name="{name}" type="decimal"{unit_attr}/>')
    if reader.int_in(0, 3):  # most formats do have X and Y, in some order
        xy = [f'<channel name="X" units="{reader.pick(UNITS[:5])}"/>', '<channel name="Y"/>']
        out[0:0] = xy if reader.flag() else xy[::-1]
    return "".join(out)


def _trace(reader: ByteReader) -> str:
    points = []
    for _ in range(reader.int_in(0, 12)):
        values = [str(reader.pick(QUALIFIERS)) + str(reader.pick(NUMBERS)) for _ in range(reader.int_in(0, 4))]
        points.append(str(reader.pick(SEPARATORS)).join(values))
    text = "".join(p + str(reader.pick(POINT_SEPARATORS)) for p in points)
    ref = f' contextRef="{reader.pick(REFS)}"' if reader.int_in(0, 3) == 0 else ""
    return f"<trace{ref}>{text}</trace>"


def built_document(reader: ByteReader) -> bytes:
    encoding = str(reader.pick(ENCODINGS))
    parts = []
    if reader.int_in(0, 3):
        parts.append(f'<?xml version="1.0" encoding="{encoding}"?>\n' if encoding else '<?xml version="1.0"?>\n')
    if reader.int_in(0, 15) == 0:
        parts.append(str(reader.pick(EXTRAS)))
    root = "ink" if reader.int_in(0, 7) else str(reader.pick(("inkml:ink", "INK", "notink", "x:ink")))
    namespace = str(reader.pick(NAMESPACES))
    if root.startswith("inkml:"):
        namespace = 'xmlns:inkml="http://www.w3.org/2003/InkML"'
    parts.append(f"<{root} {namespace}>")
    prefix = "inkml:" if root.startswith("inkml:") else ""
    if reader.flag():
        parts.append(f"<{prefix}traceFormat>{_channels(reader)}</{prefix}traceFormat>")
    if reader.flag():
        parts.append("<definitions>")
        parts.append(f'<traceFormat xml:id="tf">{_channels(reader)}</traceFormat>')
        parts.append(f'<context xml:id="ctx"><traceFormat>{_channels(reader)}</traceFormat></context>')
        parts.append(f'<context xml:id="ctx2" traceFormatRef="{reader.pick(REFS)}"/>')
        parts.append("</definitions>")
    for _ in range(reader.int_in(0, 5)):
        kind = reader.int_in(0, 7)
        if kind == 0:
            ref = reader.pick(REFS)
            inner = "".join(_trace(reader) for _ in range(reader.int_in(0, 3)))
            parts.append(f'<traceGroup contextRef="{ref}">{inner}</traceGroup>')
        elif kind == 1:
            parts.append(str(reader.pick(EXTRAS)))
        else:
            trace = _trace(reader)
            parts.append(trace.replace("<trace", f"<{prefix}trace").replace("</trace", f"</{prefix}trace"))
    if reader.int_in(0, 15):
        parts.append(f"</{root}>")
    text = "".join(parts)
    # Mostly UTF-8 bytes whatever the declaration says (a liar is the interesting case), sometimes what it says.
    codec = encoding if reader.int_in(0, 3) == 0 else "utf-8"
    try:
        data = text.encode(codec, errors="replace")
    except (LookupError, ValueError):
        data = text.encode("utf-8")
    return data + reader.rest()[:64]  # trailing bytes: garbage after the root


def check_inkml(data: bytes, declared: str | None = INKML) -> None:
    """The decoder's contract on one upload; AssertionError (with the original exception) when broken."""
    try:
        page = decode_upload(data, declared)
    except DecodeError as exc:
        assert exc.http_status in (415, 422) and exc.code and exc.code.isupper() and exc.message, vars(exc)
        try:
            probe_upload(data, declared)
        except DecodeError as probe_exc:
            assert probe_exc.code == exc.code, f"probe says {probe_exc.code}, decode says {exc.code}"
        else:
            raise AssertionError(f"probe_upload accepted what decode_upload refused ({exc.code}: {exc.message})")
        return
    except Exception as exc:
        raise AssertionError(f"decode_upload raised {type(exc).__name__}: {exc}") from exc
    if page.kind == "image":
        return  # the bytes were an image after all (a declared type that says so): the image target's business
    assert page.kind == "ink" and page.content_type == INKML and page.image is None
    for stroke in page.strokes:
        assert isinstance(stroke, np.ndarray) and stroke.dtype == np.float64, stroke
        assert stroke.ndim == 2 and stroke.shape[1] == 2 and stroke.shape[0] >= 1, stroke.shape
        assert np.isfinite(stroke).all(), f"a stroke has a coordinate that is not finite: {stroke}"
    try:
        probed = probe_upload(data, declared)
    except Exception as exc:
        raise AssertionError(f"probe_upload refused what decode_upload read: {exc!r}") from exc
    assert probed.strokes == len(page.strokes) and probed.points == sum(len(s) for s in page.strokes)


def test_one_input(data: bytes) -> None:
    reader = ByteReader(data)
    mode = reader.byte()
    declared = DECLARED[reader.byte() % len(DECLARED)]
    document = built_document(reader) if mode & 1 else reader.rest()
    check_inkml(document, declared)


if __name__ == "__main__":
    fuzz_main(test_one_input, sys.argv)
