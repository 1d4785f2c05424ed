"""Small valid pages the fuzz targets start from, made here with Pillow (images) and by hand (InkML).

`seed_images()` and `seed_inkml()` are used by the targets themselves (structure-aware mutation
starts from one of them) and by `python -m fuzz.seeds`, which writes the committed seed corpus
under fuzz/corpus/<target>/ (a few KB each: libFuzzer grows its own corpus under var/fuzz/).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def _page(mode: str, size: tuple[int, int] = (40, 28)) -> object:
    from PIL import Image, ImageDraw

    image = Image.new("L", size, 250)
    draw = ImageDraw.Draw(image)
    draw.line([(3, 3), (size[0] - 4, size[1] - 5)], fill=20, width=2)
    draw.rectangle([(6, 14), (18, 24)], outline=40)
    if mode == "P+transparency":
        paletted = image.convert("P")
        paletted.info["transparency"] = 0
        return paletted
    if mode in ("I;16", "I", "F"):
        return image.convert("I").point(lambda v: v * 200).convert(mode) if mode != "I;16" else image.convert(mode)
    return image.convert(mode)


def _save(image: object, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)  # type: ignore[attr-defined]
    return buffer.getvalue()


@functools.cache
def seed_images() -> dict[str, bytes]:
    """name → bytes: PNG, JPEG and TIFF pages in the modes and options a scanner or a phone makes."""
    from PIL import Image

    seeds = {
        "gray.png": _save(_page("L"), "PNG", dpi=(300, 300)),
        "rgb-interlaced.png": _save(_page("RGB"), "PNG", interlace=1),
        "rgba.png": _save(_page("RGBA"), "PNG"),
        "palette-transparent.png": _save(_page("P+transparency"), "PNG"),
        "bilevel.png": _save(_page("1"), "PNG"),
        "gray16.png": _save(_page("I;16"), "PNG"),
        "gray.jpg": _save(_page("L"), "JPEG", quality=60),
        "rgb-progressive.jpg": _save(_page("RGB"), "JPEG", progressive=True, dpi=(200, 200)),
        "cmyk.jpg": _save(_page("CMYK"), "JPEG"),
        "gray-lzw.tif": _save(_page("L"), "TIFF", compression="tiff_lzw", dpi=(300, 300)),
        "rgb-deflate.tif": _save(_page("RGB"), "TIFF", compression="tiff_adobe_deflate"),
        "bilevel-g4.tif": _save(_page("1"), "TIFF", compression="group4"),
        "float.tif": _save(_page("F"), "TIFF"),
        "packbits.tif": _save(_page("L"), "TIFF", compression="packbits"),
    }
    # A phone photo lying on its side: the EXIF orientation tag (6 = rotate 90° clockwise).
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds["rotated-exif.jpg"] = _save(_page("L"), "JPEG", exif=exif.tobytes())
    # Two pages in one TIFF: the IFD chain has a second link.
    first, second = _page("L"), _page("L", (20, 20))
    seeds["two-pages.tif"] = _save(first, "TIFF", save_all=True, append_images=[second])
    return seeds


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC, so that a mutated PNG gets past the checksum to the decoder."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(data):
            out += data[pos:]
            return bytes(out)
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : end]
        out += png_chunk(kind, body)
        pos = end + 4
    out += data[pos:]
    return bytes(out)


INKML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n<ink xmlns="http://www.w3.org/2003/InkML">\n'


def seed_inkml() -> dict[str, bytes]:
    """name → bytes: InkML pages using the features the decoder reads (units, contexts, difference encodings)."""
    return {
        "plain.inkml": (
            INKML_HEAD + '<traceFormat><channel name="X" type="decimal" units="mm"/>'
            '<channel name="Y" type="decimal" units="mm"/><channel name="T" type="integer" units="ms"/></traceFormat>\n'
            "<trace>10 20 0, 11 21 10, 12 23 20</trace>\n<trace>30 40 0, 31.5 40.25 10</trace>\n</ink>\n"
        ).encode(),
        "contexts.inkml": (
            INKML_HEAD + "<definitions>"
            '<traceFormat xml:id="tf-cm"><channel name="X" units="cm"/><channel name="Y" units="cm"/></traceFormat>'
            '<context xml:id="ctx-in"><traceFormat><channel name="Y" units="in"/><channel name="X" units="in"/>'
            "</traceFormat></context>"
            '<context xml:id="ctx-ref" traceFormatRef="#tf-cm"/></definitions>\n'
            '<traceGroup contextRef="#ctx-in"><trace>1 2, 1.1 2.2</trace>'
            '<trace contextRef="#ctx-ref">3 4, 3.5 4.5</trace></traceGroup>\n</ink>\n'
        ).encode(),
        "differences.inkml": (
            INKML_HEAD + "<trace>10 10, '1 '2, \"0.5 \"-0.5, !20 20, '0 '0</trace>\n"
            "<trace>1e1 2E-1,\n\t-3 +4 , .5 5.</trace>\n</ink>\n"
        ).encode(),
        "prefixed.inkml": (
            b'<inkml:ink xmlns:inkml="http://www.w3.org/2003/InkML"><inkml:trace>1 2, 3 4</inkml:trace></inkml:ink>'
        ),
    }


def write_corpus() -> None:
    """Write the committed seed corpus (one file per seed, in each target's input layout)."""
    from fuzz import image, inkml, upload

    for name, data in seed_inkml().items():
        _write("inkml", name, inkml.raw_input(data))
    _write("inkml", "built-1", bytes([1]) + bytes(range(1, 80)))
    _write("inkml", "built-2", bytes([3]) + bytes(range(200, 120, -1)))
    for name, data in seed_images().items():
        _write("image", name, image.raw_input(data))
    _write("image", "mutated-1", bytes([1, 0, 3]) + bytes(range(7, 40)))
    _write("image", "mutated-2", bytes([1, 2, 5]) + bytes(range(100, 60, -1)))
    for name, data in upload.seed_inputs().items():
        _write("upload", name, data)


def _write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


if __name__ == "__main__":
    write_corpus()
