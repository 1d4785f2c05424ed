"""Decoding pen uploads: the one place that turns uploaded bytes into a page the OCR can read.

Two kinds of page come from docking stations:
- an image (PNG, JPEG or TIFF scan or render of the form): decoded to a grayscale `uint8` array,
  dark ink on a light page;
- InkML (`application/inkml+xml`, the pen's strokes): decoded to a list of strokes, each an
  (N, 2) float array of (x, y) in millimetres from the page's top-left corner, x right, y down.

The type is decided by the content (magic bytes, then a parse), never by the declared
Content-Type alone. Everything that goes wrong raises `DecodeError(code, message)`, whose
`http_status` the upload API answers with (415 for a type we do not take, 422 for a file we
cannot or will not read). `probe_upload` is the upload-time check: cheap for images (headers,
dimensions, checksums), a full parse for InkML; `decode_upload` is the full decode the OCR uses.
Both refuse what is not one form page: a TIFF of several pages, an InkML with more traces or points
(or XML elements) than a form holds, counted while the XML is parsed, before any point is read.

XML is parsed with defusedxml, which refuses DTDs, entity declarations and external references:
a billion-laughs or an external-entity upload is a 422, never an expansion.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import Literal
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

PNG = "image/png"
JPEG = "image/jpeg"
TIFF = "image/tiff"
INKML = "application/inkml+xml"
SUPPORTED_TYPES = (PNG, JPEG, TIFF, INKML)

# An A4 page at 600 dpi is 35 Mpx; anything much larger is not a form but a decompression bomb.
MAX_PAGE_PIXELS = 40_000_000
# Pillow's own guard, for every Image.open in this process (it raises past twice this).
Image.MAX_IMAGE_PIXELS = MAX_PAGE_PIXELS
# A truncated image is an error, never a silently grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Declared types we treat as "the station did not say": the content decides.
_UNDECLARED = {"", "application/octet-stream", "binary/octet-stream"}
_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG, "image/tif": TIFF, "image/x-tiff": TIFF,
            "application/xml": INKML, "text/xml": INKML, "application/x-inkml+xml": INKML}

# The most ink a form page holds; past either the InkML is refused (422 INKML_TOO_LARGE) before its points
# are parsed. The largest form (primaire-2011-t1, 36 boxes) filled as the benchmark fills it
# (tests/form_fill.py, 200 pages for each election) has 10-34 traces and 344-979 points, 44 traces and 1,649
# points with every box written. A real pen samples about 100 points a second and a digit takes under a
# second: ~100 points a box, 3,600 for every box, twice that with every box struck out and written again,
# and a signature of a few seconds and a few dozen strokes: about 200 traces and 8,000 points at most.
# 5,000 traces is 25 times that, 100,000 points 12 times (17 minutes of pen-down at 100 Hz), and the OCR
# still reads such a page in seconds; a page of 20 MiB (the upload limit) of one-point traces, 877,870 of
# them, cost 22 s of CPU to probe in the request and 95 s to read.
MAX_INK_TRACES = 5_000
MAX_INK_POINTS = 100_000
# And the XML around them: a page is its traces and a few definitions; ten elements a trace at the trace
# limit (groups, annotations, views) is room enough. 20 MiB of empty elements, 5.2 million, cost 33 s of
# CPU to probe, though they hold no trace at all.
MAX_INK_ELEMENTS = 50_000

INKML_NS = "http://www.w3.org/2003/InkML"
XML_NS = "http://www.w3.org/XML/1998/namespace"
MM_PER_UNIT = {"mm": 1.0, "cm": 10.0, "in": 25.4, "m": 1000.0}


class DecodeError(Exception):
    """An upload we cannot or will not read; `code` is machine-readable, `message` says why in plain words."""

    def __init__(self, code: str, message: str, http_status: int = 422) -> None:
        super().__init__(message)
        self.code, self.message, self.http_status = code, message, http_status


@dataclass(frozen=True)
class DecodedPage:
    """One page of an upload: `image` for a scan (kind "image"), `strokes` for InkML (kind "ink")."""

    kind: Literal["image", "ink"]
    content_type: str
    image: np.ndarray | None = None  # (height, width) uint8, 0 = black ink, 255 = white paper
    dpi: float | None = None  # from the image's metadata, when it says
    strokes: list[np.ndarray] = field(default_factory=list)  # each (N, 2) float64, millimetres

    @property
    def is_ink(self) -> bool:
        return self.kind == "ink"


@dataclass(frozen=True)
class ProbedUpload:
    """What the upload-time check learnt: the real type, and the page's size (pixels, or strokes/points)."""

    content_type: str
    width: int = 0
    height: int = 0
    strokes: int = 0
    points: int = 0


# --- the type, by content ---

def sniff(data: bytes) -> str | None:
    """The supported type these bytes really are, by their magic bytes; None when none."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return TIFF
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith((b"<?xml", b"<ink", b"<!DOCTYPE", b"<!--")) or re.match(rb"<[A-Za-z_][\w.-]*:ink[\s>]", head):
        return INKML
    return None


def real_content_type(data: bytes, declared: str | None) -> str:
    """The type to decode as: what the bytes are, provided the declared type (if any) agrees."""
    declared_type = (declared or "").split(";", 1)[0].strip().lower()
    declared_type = _ALIASES.get(declared_type, declared_type)
    actual = sniff(data)
    if actual is None:
        shown = declared_type or "no declared type"
        raise DecodeError("UNSUPPORTED_MEDIA_TYPE",
                          f"the file is not PNG, JPEG, TIFF or InkML ({shown}); those are the formats accepted", 415)
    if declared_type not in _UNDECLARED and declared_type != actual:
        if declared_type not in SUPPORTED_TYPES:
            raise DecodeError("UNSUPPORTED_MEDIA_TYPE",
                              f"declared type {declared_type} is not accepted; send PNG, JPEG, TIFF or InkML", 415)
        raise DecodeError("CONTENT_TYPE_MISMATCH", f"declared as {declared_type} but the file is {actual}", 415)
    return actual


# --- images ---

# What Pillow raises on a damaged file besides OSError: its plugins index tables with values read
# from the file, so a corrupt one also shows as KeyError/IndexError (an unknown TIFF compression
# code in a later IFD), arithmetic errors, struct.error or TypeError (fuzz/image.py found these).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, TypeError, struct_error, LookupError, ArithmeticError)


def _open_image(data: bytes, content_type: str) -> Image.Image:
    fmt = {PNG: "PNG", JPEG: "JPEG", TIFF: "TIFF"}[content_type]
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice it Pillow only warns: make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("IMAGE_TOO_LARGE", f"the image is too large to be a form page: {exc}") from exc
    except (UnidentifiedImageError, *_CORRUPT) as exc:
        raise DecodeError("CORRUPT_IMAGE", f"the {fmt} file cannot be read: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > MAX_PAGE_PIXELS:
        raise DecodeError("IMAGE_TOO_LARGE",
                          f"{width}x{height} pixels is not a form page (at most {MAX_PAGE_PIXELS} pixels)")
    return image


def _probe_image(data: bytes, content_type: str) -> ProbedUpload:
    image = _open_image(data, content_type)
    width, height = image.size
    try:
        if content_type == PNG:
            _one_page(image)  # an animated PNG: its frames are the pages
            # verify() walks every chunk to IEND and checks its CRC: truncation and bit rot show.
            image.verify()
        elif content_type == JPEG:
            # Decoding at 1/8 scale still reads the whole entropy-coded stream (a truncated or
            # damaged JPEG fails), for a fraction of a full decode's cost.
            image.draft("L", (max(1, width // 8), max(1, height // 8)))
            image.load()
        else:
            # TIFF has no cheap whole-file check: decode it (rare from docking stations).
            _one_page(image)  # walks the IFD chain: a broken chain shows here
            image.load()
    except Image.DecompressionBombError as exc:
        raise DecodeError("IMAGE_TOO_LARGE", f"the image is too large to be a form page: {exc}") from exc
    except _CORRUPT as exc:
        raise DecodeError("CORRUPT_IMAGE", f"the image is damaged or truncated: {exc}") from exc
    return ProbedUpload(content_type, width=width, height=height)


def _one_page(image: Image.Image) -> None:
    """Refuse a TIFF of several pages, or an animated PNG: only the first page would be read, and a second
    form in it never would.

    A JPEG of several pictures (MPO, as some cameras write) is read as its first: the others are that
    picture's previews or stereo views, not other pages."""
    pages = getattr(image, "n_frames", 1)
    if pages > 1:
        raise DecodeError("MULTIPLE_PAGES", f"the {image.format} has {pages} pages (frames); send each page "
                                            f"of a form in an upload of its own")


def _decode_image(data: bytes, content_type: str) -> DecodedPage:
    image = _open_image(data, content_type)
    dpi = image.info.get("dpi")
    try:
        if content_type == JPEG:
            # A colour JPEG decoded straight to its luma: what convert("L") would compute (within
            # rounding), without building the RGB page first.
            image.draft("L", image.size)
        elif content_type in (TIFF, PNG):
            _one_page(image)  # an upload stored before the probe refused them is not read as its first page alone
        image.load()
        image = ImageOps.exif_transpose(image) or image  # a phone photo's orientation tag
        gray = _to_gray(image)
    except Image.DecompressionBombError as exc:
        raise DecodeError("IMAGE_TOO_LARGE", f"the image is too large to be a form page: {exc}") from exc
    except _CORRUPT as exc:
        raise DecodeError("CORRUPT_IMAGE", f"the image is damaged or truncated: {exc}") from exc
    pixels = np.asarray(gray, dtype=np.uint8)
    if pixels.size and _median_is_dark(pixels):
        # A negative scan (white ink on black): the pipeline expects dark ink on a light page.
        pixels = 255 - pixels
    return DecodedPage("image", content_type, image=np.ascontiguousarray(pixels), dpi=_dpi(dpi))


def _median_is_dark(pixels: np.ndarray) -> bool:
    """Exactly `np.median(pixels) < 128`, from a count instead of a partial sort (~1 ms against 25-160 ms
    on a noisy 300 dpi scan): the median is below 128 when more than half of the pixels are; at an
    exact half it is the mean of the darkest pixel at or above 128 and the lightest below."""
    dark = pixels < 128
    count, half = int(np.count_nonzero(dark)), pixels.size / 2
    if count != half:
        return count > half
    return int(pixels[dark].max()) + int(pixels[~dark].min()) < 256


def _dpi(value: object) -> float | None:
    """The horizontal resolution the metadata states, when it is a usable number.

    A TIFF's XResolution is whatever type the file says: a text ("\x01"), a rational with a zero
    denominator (NaN), a negative number; none of them is a resolution (fuzz/image.py found these)."""
    if not isinstance(value, tuple) or not value:
        return None
    try:
        dpi = float(value[0])
    except (TypeError, ValueError, ArithmeticError):
        return None
    return dpi if math.isfinite(dpi) and dpi > 0 else None


def _to_gray(image: Image.Image) -> Image.Image:
    if image.mode == "L":
        return image  # convert("L") would copy the page (11 Mpx for a scan with margins) to no end
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are paper, not ink: flatten onto white before dropping alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        blank = np.isnan(array)  # a pixel with no value is paper, not ink
        if blank.any():
            array = np.where(blank, np.nanmax(array, initial=1.0), array)
        return Image.fromarray(np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8), "L")
    return image.convert("L")


# --- InkML ---

_VALUE = re.compile(r"""\s*([!'"]?)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)""")


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _too_much_ink(what: str, limit: int) -> DecodeError:
    return DecodeError("INKML_TOO_LARGE",
                       f"the InkML has more than {limit:,} {what}: a filled form has a few dozen traces and a few "
                       f"thousand points, so this is not one form page")


def _parse_xml(data: bytes) -> Element:
    """The InkML document's tree, counting elements, traces and points as it is built and stopping past the limits.

    A trace's points are counted as its comma-separated parts, before any is parsed (blank parts are no
    point but cost the parse a step all the same)."""
    traces = points = 0
    try:
        parsing = defusedxml.ElementTree.iterparse(io.BytesIO(data), events=("end",), forbid_dtd=True,
                                                   forbid_entities=True, forbid_external=True)
        for elements, (_event, element) in enumerate(parsing, start=1):
            if elements > MAX_INK_ELEMENTS:
                raise _too_much_ink("XML elements", MAX_INK_ELEMENTS)
            if _local(element.tag) != "trace":
                continue
            traces += 1
            if traces > MAX_INK_TRACES:
                raise _too_much_ink("traces", MAX_INK_TRACES)
            text = element.text
            if text and not text.isspace():
                points += text.count(",") + 1
                if points > MAX_INK_POINTS:
                    raise _too_much_ink("points", MAX_INK_POINTS)
        root = parsing.root  # type: ignore[attr-defined]
    except defusedxml.DefusedXmlException as exc:
        raise DecodeError("XML_FORBIDDEN",
                          f"the InkML declares a DTD, entities or external references, which are refused: {exc!r}"
                          ) from exc
    except ParseError as exc:
        raise DecodeError("BAD_INKML", f"the InkML is not well-formed XML: {exc}") from exc
    except (LookupError, ValueError) as exc:
        # The XML declaration names an encoding expat cannot use: unknown ("foo"), not a text
        # codec ("rot13"), or multi-byte ("shift_jis", "utf-7"), which pyexpat refuses with ValueError.
        raise DecodeError("BAD_INKML", f"the InkML declares an encoding that cannot be read: {exc}") from exc
    if _local(root.tag) != "ink" or (root.tag.startswith("{") and not root.tag.startswith(f"{{{INKML_NS}}}")):
        raise DecodeError("BAD_INKML", f"the XML root is <{_local(root.tag)}>, not an InkML <ink> element")
    return root


@dataclass(frozen=True)
class _Format:
    """A traceFormat: the channel names in order and the factor that takes X and Y to millimetres."""

    names: tuple[str, ...]
    x_index: int
    y_index: int
    x_scale: float
    y_scale: float


def _trace_format(element: Element) -> _Format:
    names: list[str] = []
    scales: dict[str, float] = {}
    # Only the regular channels (direct children) are in every point; intermittent ones follow
    # them and may be missing, and we need nothing from them.
    for channel in element:
        if _local(channel.tag) != "channel":
            continue
        name = channel.get("name", "")
        units = (channel.get("units") or "mm").strip().lower()
        if name in ("X", "Y"):
            if units not in MM_PER_UNIT:
                raise DecodeError("BAD_INKML", f"channel {name} is in {units!r}; units accepted: mm, cm, in")
            scales[name] = MM_PER_UNIT[units]
        names.append(name)
    if "X" not in names or "Y" not in names:
        raise DecodeError("BAD_INKML", "the traceFormat has no X and Y channels")
    return _Format(tuple(names), names.index("X"), names.index("Y"), scales["X"], scales["Y"])


_DEFAULT_FORMAT = _Format(("X", "Y"), 0, 1, 1.0, 1.0)


def _formats(root: Element) -> tuple[_Format, dict[str, _Format]]:
    """The document's default trace format, and every format or context by its xml:id."""
    by_id: dict[str, _Format] = {}
    default: _Format | None = None
    for element in root.iter():
        name = _local(element.tag)
        if name == "traceFormat":
            fmt = _trace_format(element)
            ident = element.get(f"{{{XML_NS}}}id")
            if ident:
                by_id[ident] = fmt
            if default is None:
                default = fmt
    # An inkSource's traceFormat is the format of what its device records: a context naming that inkSource (inline,
    # as Windows Ink writes its InkML, or by inkSourceRef) and no traceFormat of its own records in that format.
    sources: dict[str, _Format] = {}
    for element in root.iter():
        if _local(element.tag) == "inkSource":
            inner = next((e for e in element if _local(e.tag) == "traceFormat"), None)
            ident = element.get(f"{{{XML_NS}}}id")
            if ident and inner is not None:
                sources[ident] = _trace_format(inner)
    for element in root.iter():
        if _local(element.tag) != "context":
            continue
        ident = element.get(f"{{{XML_NS}}}id")
        inner = next((e for e in element if _local(e.tag) == "traceFormat"), None)
        source = next((e for e in element if _local(e.tag) == "inkSource"), None)
        if inner is None and source is not None:
            inner = next((e for e in source if _local(e.tag) == "traceFormat"), None)
        ref = (element.get("traceFormatRef") or "").lstrip("#")
        source_ref = (element.get("inkSourceRef") or "").lstrip("#")
        base = (element.get("contextRef") or "").lstrip("#")
        if inner is not None:
            fmt: _Format | None = _trace_format(inner)
        elif ref:
            fmt = by_id.get(ref)
        elif source_ref:
            fmt = sources.get(source_ref)
        elif base:
            fmt = by_id.get(base)  # the context it refines, defined before it
        else:
            fmt = default or _DEFAULT_FORMAT  # a brush or a canvas only: the format of traces without a context
        if ident and fmt is not None:
            by_id[ident] = fmt
    return default or _DEFAULT_FORMAT, by_id


_PLAIN_CHARACTERS = re.compile(r"[\d\s,.eE+-]*")  # numbers, blanks and commas: no ' or " difference encoding


def _plain_points(text: str, width: int) -> np.ndarray | None:
    """The trace's values, (N, width), when every value is explicit and every point has `width` of them (what
    pens send), read at once rather than a Python step per point; None for anything else, which the general
    reader below then reads, or refuses, the same as ever."""
    if not _PLAIN_CHARACTERS.fullmatch(text):
        return None
    if not set(map(len, map(str.split, text.split(",")))) <= {0, width}:  # blank parts are skipped, as below
        return None
    try:
        # float() reads exactly the numbers _VALUE does from these characters ("1-2", two values there, is
        # one malformed number here: the general reader takes it).
        return np.array(list(map(float, text.replace(",", " ").split())), dtype=np.float64).reshape(-1, width)
    except ValueError:
        return None


def _trace_points(text: str, fmt: _Format) -> np.ndarray:
    """One trace's points as an (N, 2) array in millimetres, resolving the ' and " difference encodings."""
    width = len(fmt.names)
    plain = _plain_points(text, width)
    if plain is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # 1e308 inches: infinite, refused just below
            points = np.stack([plain[:, fmt.x_index] * fmt.x_scale, plain[:, fmt.y_index] * fmt.y_scale], axis=1)
        if not np.isfinite(points).all():
            raise DecodeError("BAD_INKML", "a trace has a coordinate that is not a finite number")
        return points
    value = [0.0] * width
    velocity = [0.0] * width
    mode = ["!"] * width
    rows: list[tuple[float, float]] = []
    for number, point in enumerate(text.split(",")):
        if not point.strip():
            continue
        tokens = _VALUE.findall(point)
        consumed = "".join(q + v for q, v in tokens)
        if consumed != re.sub(r"\s+", "", point) or len(tokens) < max(fmt.x_index, fmt.y_index) + 1:
            raise DecodeError("BAD_INKML", f"trace point {number + 1} {point.strip()[:40]!r} is not a list of numbers")
        for i, (qualifier, raw) in enumerate(tokens[:width]):
            if qualifier:
                mode[i] = qualifier
            v = float(raw)
            if mode[i] == "!":
                velocity[i] = v - value[i] if number else 0.0
                value[i] = v
            elif mode[i] == "'":
                velocity[i] = v
                value[i] += v
            else:  # second difference
                velocity[i] += v
                value[i] += velocity[i]
        rows.append((value[fmt.x_index] * fmt.x_scale, value[fmt.y_index] * fmt.y_scale))
    points = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(points).all():
        raise DecodeError("BAD_INKML", "a trace has a coordinate that is not a finite number")
    return points


def _decode_inkml(data: bytes) -> DecodedPage:
    root = _parse_xml(data)
    default, by_id = _formats(root)
    # A trace without its own contextRef takes its nearest enclosing traceGroup's. One walk down the
    # tree, in document order, carrying the inherited reference: scanning every group's descendants
    # instead was quadratic in the nesting depth (12,000 nested groups, 0.5 MB: 11 s of CPU).
    strokes: list[np.ndarray] = []
    walk: list[tuple[Element, str]] = [(root, "")]
    while walk:
        element, inherited = walk.pop()
        name = _local(element.tag)
        if name == "traceGroup" and element.get("contextRef"):
            inherited = element.get("contextRef", "")
        elif name == "trace":
            fmt = default
            ref = (element.get("contextRef") or inherited).lstrip("#")
            if ref:
                if ref not in by_id:
                    raise DecodeError("BAD_INKML", f"a trace refers to #{ref}, which the document does not define")
                fmt = by_id[ref]
            points = _trace_points(element.text or "", fmt)
            if len(points):
                strokes.append(points)
        walk.extend((child, inherited) for child in reversed(element))
    return DecodedPage("ink", INKML, strokes=strokes)


# --- the two entry points ---

def probe_upload(data: bytes, content_type: str | None) -> ProbedUpload:
    """The upload-time check: the real type, and a page that will decode. Raises DecodeError."""
    if not data:
        raise DecodeError("EMPTY_FILE", "the uploaded file is empty")
    actual = real_content_type(data, content_type)
    if actual == INKML:
        page = _decode_inkml(data)
        return ProbedUpload(INKML, strokes=len(page.strokes), points=sum(len(s) for s in page.strokes))
    return _probe_image(data, actual)


def decode_upload(data: bytes, content_type: str | None) -> DecodedPage:
    """The whole page, for recognition. Raises DecodeError (code, message) for what cannot be read."""
    if not data:
        raise DecodeError("EMPTY_FILE", "the uploaded file is empty")
    actual = real_content_type(data, content_type)
    if actual == INKML:
        return _decode_inkml(data)
    return _decode_image(data, actual)

