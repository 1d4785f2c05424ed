"""Decoding uploads: InkML units, channel order and encodings, image modes, and everything refused."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from pen_helpers import (
    BILLION_LAUGHS,
    EXTERNAL_DTD,
    EXTERNAL_ENTITY,
    bomb_png,
    huge_png_header,
    inkml_page,
    scribbled_page,
)
from PIL import Image

import pen_gateway.decode
from pen_gateway.decode import (
    INKML,
    JPEG,
    MAX_INK_ELEMENTS,
    MAX_INK_POINTS,
    MAX_INK_TRACES,
    PNG,
    TIFF,
    DecodeError,
    decode_upload,
    probe_upload,
    real_content_type,
)

STROKE = [(10.0, 20.0), (12.5, 20.0), (12.5, 30.25)]


def _image_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _code(data: bytes, content_type: str | None, *, probe: bool = False) -> tuple[str, int]:
    with pytest.raises(DecodeError) as caught:
        (probe_upload if probe else decode_upload)(data, content_type)
    return caught.value.code, caught.value.http_status


# --- InkML ---

@pytest.mark.parametrize(("units", "factor"), [("mm", 1.0), ("cm", 10.0), ("in", 25.4), (None, 1.0)])
def test_inkml_units_become_millimetres(units: str | None, factor: float) -> None:
    page = decode_upload(inkml_page([STROKE, STROKE[:2]], units=units), INKML)
    assert page.kind == "ink" and page.is_ink and page.image is None
    assert len(page.strokes) == 2
    assert page.strokes[0].shape == (3, 2) and page.strokes[0].dtype == np.float64
    np.testing.assert_allclose(page.strokes[0], np.array(STROKE) * factor)


def test_inkml_channel_order_comes_from_the_trace_format() -> None:
    doc = b"""<ink xmlns="http://www.w3.org/2003/InkML">
      <traceFormat><channel name="T"/><channel name="Y" units="cm"/><channel name="X" units="mm"/></traceFormat>
      <trace>0 2 10, 5 2.5 12.5</trace>
    </ink>"""
    (stroke,) = decode_upload(doc, INKML).strokes
    np.testing.assert_allclose(stroke, [[10.0, 20.0], [12.5, 25.0]])


def test_inkml_difference_encodings() -> None:
    # Explicit first point, then first differences ('), then second differences (").
    doc = b"""<ink xmlns="http://www.w3.org/2003/InkML">
      <trace>10 20, '1 '2, 1 2, "0 "1, 0 0</trace>
    </ink>"""
    (stroke,) = decode_upload(doc, INKML).strokes
    # velocities: (1,2) (1,2) then second differences (0,1) → (1,3), then (0,0) → (1,3)
    np.testing.assert_allclose(stroke, [[10, 20], [11, 22], [12, 24], [13, 27], [14, 30]])


def test_inkml_contexts_and_trace_groups() -> None:
    doc = b"""<?xml version="1.0" encoding="UTF-8"?>
    <ink xmlns="http://www.w3.org/2003/InkML">
      <definitions>
        <traceFormat xml:id="inches"><channel name="X" units="in"/><channel name="Y" units="in"/></traceFormat>
        <context xml:id="ctx-cm"><traceFormat><channel name="X" units="cm"/><channel name="Y" units="cm"/>
          <intermittentChannels><channel name="F"/></intermittentChannels></traceFormat></context>
        <context xml:id="ctx-in" traceFormatRef="#inches"/>
      </definitions>
      <trace contextRef="#ctx-cm">1 2, 3 4</trace>
      <traceGroup contextRef="#ctx-in"><trace>1 1</trace><traceGroup><trace>2 2</trace></traceGroup></traceGroup>
    </ink>"""
    strokes = decode_upload(doc, INKML).strokes
    np.testing.assert_allclose(strokes[0], [[10, 20], [30, 40]])
    np.testing.assert_allclose(strokes[1], [[25.4, 25.4]])
    np.testing.assert_allclose(strokes[2], [[50.8, 50.8]])


def test_inkml_contexts_whose_trace_format_is_their_ink_sources_or_another_contexts() -> None:
    """A context may give its traceFormat through its inkSource (as Windows Ink's InkML does), through the context it
    refines (contextRef), or not at all (a brush only: the default format). Each is a context the document defines,
    in the units its channels declare; they were refused as 'a trace refers to #ctx, which the document does not
    define'."""
    doc = b"""<?xml version="1.0" encoding="UTF-8"?>
    <inkml:ink xmlns:inkml="http://www.w3.org/2003/InkML">
      <inkml:definitions>
        <inkml:context xml:id="ctx0">
          <inkml:inkSource xml:id="pen0">
            <inkml:traceFormat><inkml:channel name="X" type="decimal" units="cm"/>
              <inkml:channel name="Y" type="decimal" units="cm"/><inkml:channel name="F" type="integer"/>
            </inkml:traceFormat>
          </inkml:inkSource>
        </inkml:context>
        <inkml:brush xml:id="br0"/>
        <inkml:context xml:id="ctx1" contextRef="#ctx0" brushRef="#br0"/>
        <inkml:context xml:id="ctx2" inkSourceRef="#pen0"/>
        <inkml:context xml:id="ctx3" brushRef="#br0"/>
      </inkml:definitions>
      <inkml:trace contextRef="#ctx0">1 2 40, 3 4 41</inkml:trace>
      <inkml:trace contextRef="#ctx1">1 1 40</inkml:trace>
      <inkml:trace contextRef="#ctx2">2 2 40</inkml:trace>
    </inkml:ink>"""
    strokes = decode_upload(doc, INKML).strokes
    np.testing.assert_allclose(strokes[0], [[10, 20], [30, 40]])
    np.testing.assert_allclose(strokes[1], [[10, 10]])
    np.testing.assert_allclose(strokes[2], [[20, 20]])
    plain = b"""<ink xmlns="http://www.w3.org/2003/InkML"><definitions><brush xml:id="b"/>
      <context xml:id="c" brushRef="#b"/></definitions><trace contextRef="#c">10 20, 11 21</trace></ink>"""
    np.testing.assert_allclose(decode_upload(plain, INKML).strokes[0], [[10, 20], [11, 21]])


def test_inkml_without_namespace_and_with_a_prefix() -> None:
    plain = decode_upload(b"<ink><trace>1 2, 3 4</trace></ink>", None)
    prefixed = decode_upload(b'<i:ink xmlns:i="http://www.w3.org/2003/InkML"><i:trace>1 2</i:trace></i:ink>',
                             "application/octet-stream")
    assert len(plain.strokes) == 1 and len(prefixed.strokes) == 1


@pytest.mark.parametrize(("doc", "code"), [
    (BILLION_LAUGHS, "XML_FORBIDDEN"),
    (EXTERNAL_ENTITY, "XML_FORBIDDEN"),
    (EXTERNAL_DTD, "XML_FORBIDDEN"),
    (b"<?xml version='1.0'?><ink><trace>1 2", "BAD_INKML"),
    (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "BAD_INKML"),
    (b"<ink><traceFormat><channel name='X' units='furlong'/><channel name='Y'/></traceFormat></ink>", "BAD_INKML"),
    (b"<ink><traceFormat><channel name='X'/><channel name='T'/></traceFormat></ink>", "BAD_INKML"),
    (b"<ink><trace>1 2, three 4</trace></ink>", "BAD_INKML"),
    (b"<ink><trace>1, 2</trace></ink>", "BAD_INKML"),
    (b"<ink><trace contextRef='#nowhere'>1 2</trace></ink>", "BAD_INKML"),
    (b"<ink><trace>1e999 2</trace></ink>", "BAD_INKML"),
])
def test_bad_or_hostile_inkml_is_422(doc: bytes, code: str) -> None:
    assert _code(doc, INKML) == (code, 422)
    assert _code(doc, INKML, probe=True) == (code, 422)


def _one_point_traces(count: int) -> bytes:
    return b"<ink xmlns='http://www.w3.org/2003/InkML'>" + b"<trace>10 20</trace>" * count + b"</ink>"


def _one_trace_of(points: int) -> bytes:
    return b"<ink xmlns='http://www.w3.org/2003/InkML'><trace>" + b",".join([b"10 20"] * points) + b"</trace></ink>"


def test_an_inkml_page_with_more_traces_than_a_form_has_is_422_before_any_point_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert probe_upload(_one_point_traces(MAX_INK_TRACES), INKML).strokes == MAX_INK_TRACES
    read: list[str] = []
    original = pen_gateway.decode._trace_points
    monkeypatch.setattr(pen_gateway.decode, "_trace_points", lambda text, fmt: read.append(text) or original(text, fmt))
    too_many = _one_point_traces(MAX_INK_TRACES + 1)
    assert _code(too_many, INKML, probe=True) == ("INKML_TOO_LARGE", 422)
    assert _code(too_many, INKML) == ("INKML_TOO_LARGE", 422)
    assert read == []  # refused while counting, not after parsing every point


def test_an_inkml_page_with_more_points_than_a_form_has_is_422_before_any_point_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert probe_upload(_one_trace_of(MAX_INK_POINTS), INKML).points == MAX_INK_POINTS
    split = b"<ink><trace>" + b",".join([b"1 2"] * (MAX_INK_POINTS // 2)) + b"</trace><trace>" + b", ".join(
        [b"3 4"] * (MAX_INK_POINTS // 2 + 1)) + b"</trace></ink>"
    read: list[str] = []
    original = pen_gateway.decode._trace_points
    monkeypatch.setattr(pen_gateway.decode, "_trace_points", lambda text, fmt: read.append(text) or original(text, fmt))
    for doc in (_one_trace_of(MAX_INK_POINTS + 1), split):  # in one stroke, or over the page
        assert _code(doc, INKML, probe=True) == ("INKML_TOO_LARGE", 422)
        assert _code(doc, INKML) == ("INKML_TOO_LARGE", 422)
    assert read == []


def test_an_inkml_page_of_more_xml_elements_than_a_form_has_is_422_even_without_traces() -> None:
    # 20 MiB of empty elements (5.2 million) cost 33 s of CPU to probe, inside the upload request.
    filler = b"<annotation/>" * MAX_INK_ELEMENTS
    doc = b"<ink xmlns='http://www.w3.org/2003/InkML'>" + filler + b"<trace>10 20</trace></ink>"
    assert _code(doc, INKML, probe=True) == ("INKML_TOO_LARGE", 422)
    assert _code(doc, INKML) == ("INKML_TOO_LARGE", 422)
    room = b"<annotation/>" * (MAX_INK_ELEMENTS - 2)  # with the trace and <ink>, exactly the limit
    assert probe_upload(doc.replace(filler, room), INKML).strokes == 1


@pytest.mark.parametrize("text", [
    "10 20, 12.5 20, 12.5 30.25", " 1 2 ,3 4,\n5 6 , ", "1 2,,3 4", "-1.5e1 +.5, 7. 1E-2", "1-2 3, 4 5",
    "1 2 3, 4 5", "1, 2", "1 2, 3", "1e999 2", "1 2, x 3", "\u0663 4", "1\u00a02, 3 4", "1 2, '1 '1", "", "  ",
])
@pytest.mark.parametrize("names", [("X", "Y"), ("T", "Y", "X")])
def test_plain_traces_read_at_once_read_as_point_by_point(text: str, names: tuple[str, ...],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = pen_gateway.decode._Format(names, names.index("X"), names.index("Y"), 10.0, 1.0)

    def read() -> object:
        try:
            return pen_gateway.decode._trace_points(text, fmt).tolist()
        except DecodeError as exc:
            return exc.code

    at_once = read()
    monkeypatch.setattr(pen_gateway.decode, "_plain_points", lambda text, width: None)
    assert at_once == read()


# --- images ---

def test_png_decodes_to_grayscale_dark_ink_on_light() -> None:
    data = scribbled_page(400, 600, strokes=50)
    page = decode_upload(data, PNG)
    assert page.kind == "image" and not page.is_ink and page.strokes == []
    assert page.image is not None and page.image.shape == (600, 400) and page.image.dtype == np.uint8
    assert np.median(page.image) == 255 and page.image.min() < 110
    assert page.dpi == pytest.approx(300, abs=1)
    assert probe_upload(data, PNG).width == 400


def test_rgba_transparency_is_paper_and_a_negative_is_inverted() -> None:
    rgba = Image.new("RGBA", (50, 40), (0, 0, 0, 0))  # transparent black: paper
    rgba.putpixel((5, 5), (0, 0, 0, 255))  # one opaque black dot: ink
    page = decode_upload(_image_bytes(rgba, "PNG"), PNG)
    assert page.image is not None and page.image[5, 5] == 0 and page.image[0, 0] == 255
    negative = Image.new("L", (50, 40), 0)
    negative.putpixel((7, 3), 255)  # white ink on black
    page = decode_upload(_image_bytes(negative, "PNG"), PNG)
    assert page.image is not None and page.image[3, 7] == 0 and page.image[0, 0] == 255


@pytest.mark.parametrize("seed", range(4))
def test_the_negative_test_is_exactly_the_median_of_the_page(seed: int) -> None:
    from pen_gateway.decode import _median_is_dark

    rng = np.random.default_rng(seed)
    for _ in range(2000):
        low, high = sorted(int(v) for v in rng.integers(0, 256, 2))
        pixels = rng.integers(low, high + 1, (int(rng.integers(1, 9)), int(rng.integers(1, 9)))).astype(np.uint8)
        assert _median_is_dark(pixels) == (np.median(pixels) < 128), pixels
    # Exactly half dark: the mean of the two middle pixels decides (127 and 128 → 127.5 is dark, 127 and 129 not).
    assert _median_is_dark(np.array([[127, 128]], dtype=np.uint8))
    assert not _median_is_dark(np.array([[127, 129]], dtype=np.uint8))
    assert _median_is_dark(np.array([[0, 0, 255, 255]], dtype=np.uint8))  # (0 + 255) / 2 = 127.5


def test_a_colour_jpeg_is_read_as_its_luma() -> None:
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (60, 80, 3)).astype(np.uint8), "RGB")
    rgb = rgb.resize((320, 240), Image.Resampling.BICUBIC)  # smooth enough for JPEG to keep it
    data = _image_bytes(rgb, "JPEG", quality=95)
    page = decode_upload(data, JPEG)
    assert page.image is not None and page.image.shape == (240, 320)
    luma = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.int16)
    # The same luma as through RGB, but for a few saturated pixels the RGB page clipped.
    off = np.abs(page.image.astype(np.int16) - luma)
    assert (off > 1).mean() < 1e-2 and off.max() <= 8
    assert page.image.std() > 10  # a page of colours, not a flat grey


def test_jpeg_and_tiff_including_16_bit() -> None:
    gray = Image.new("L", (64, 48), 240)
    gray.putpixel((1, 1), 0)
    assert decode_upload(_image_bytes(gray.convert("RGB"), "JPEG"), JPEG).image.shape == (48, 64)  # type: ignore
    assert decode_upload(_image_bytes(gray, "TIFF", compression="tiff_lzw"), TIFF).image[1, 1] < 50  # type: ignore
    wide = Image.fromarray((np.full((48, 64), 60000)).astype(np.uint16))
    page = decode_upload(_image_bytes(wide, "TIFF"), "image/tiff")
    assert page.image is not None and page.image.dtype == np.uint8 and page.image[0, 0] == 255


def test_a_tiff_of_two_pages_is_422_not_its_first_page_alone() -> None:
    first, second = Image.new("L", (64, 48), 240), Image.new("L", (64, 48), 200)
    two = _image_bytes(first, "TIFF", save_all=True, append_images=[second])
    assert _code(two, TIFF, probe=True) == ("MULTIPLE_PAGES", 422)
    assert _code(two, TIFF) == ("MULTIPLE_PAGES", 422)
    one = _image_bytes(first, "TIFF", save_all=True)
    assert probe_upload(one, TIFF).width == 64 and decode_upload(one, TIFF).image is not None


def test_an_animated_png_is_422_but_a_camera_jpeg_of_several_pictures_is_its_first() -> None:
    first, second = Image.new("L", (64, 48), 240), Image.new("L", (64, 48), 20)
    animated = _image_bytes(first, "PNG", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(animated)).n_frames == 2
    assert _code(animated, PNG, probe=True) == ("MULTIPLE_PAGES", 422)
    assert _code(animated, PNG) == ("MULTIPLE_PAGES", 422)
    # MPO: the picture, then its previews; the page is the first.
    mpo = _image_bytes(first.convert("RGB"), "MPO", save_all=True, append_images=[second.convert("RGB")])
    assert Image.open(io.BytesIO(mpo)).n_frames == 2
    assert probe_upload(mpo, JPEG).width == 64
    page = decode_upload(mpo, JPEG)
    assert page.image is not None and abs(int(page.image.mean()) - 240) <= 2


def test_pixels_of_no_value_in_a_float_tiff_are_paper() -> None:
    values = np.full((48, 64), 0.9, dtype=np.float32)
    values[10:20, 10:20] = np.nan
    values[30, 30] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's cast of NaN warns (and gives 0, ink) where it is not handled
        page = decode_upload(_image_bytes(Image.fromarray(values, "F"), "TIFF"), TIFF)
    assert page.image is not None
    assert page.image[10:20, 10:20].min() >= page.image[0, 0] >= 229  # as light as the page, or lighter
    assert page.image[30, 30] == 0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_corrupt_and_truncated_images_are_422(fmt: str) -> None:
    data = scribbled_page(800, 1000, strokes=300, fmt=fmt)
    content_type = {"PNG": PNG, "JPEG": JPEG, "TIFF": TIFF}[fmt]
    for broken in (data[: len(data) // 2], data[:-64]):
        assert _code(broken, content_type, probe=True) == ("CORRUPT_IMAGE", 422)
        assert _code(broken, content_type) == ("CORRUPT_IMAGE", 422)
    if fmt == "PNG":  # a flipped bit inside a chunk fails its CRC
        middle = len(data) // 2
        flipped = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]
        assert _code(flipped, content_type, probe=True) == ("CORRUPT_IMAGE", 422)


def test_decompression_bombs_are_422_without_decoding() -> None:
    bomb = bomb_png()  # ~48 Mpx in a few tens of KB
    assert len(bomb) < 200_000
    assert _code(bomb, PNG, probe=True) == ("IMAGE_TOO_LARGE", 422)
    assert _code(bomb, PNG) == ("IMAGE_TOO_LARGE", 422)
    assert _code(huge_png_header(100_000, 100_000), PNG, probe=True) == ("IMAGE_TOO_LARGE", 422)


# --- the type is the content's ---

def test_the_real_type_is_sniffed_and_must_agree_with_the_declared_one() -> None:
    png = scribbled_page(100, 100, strokes=5)
    assert real_content_type(png, "image/png") == PNG
    assert real_content_type(png, "application/octet-stream") == PNG
    assert real_content_type(png, None) == PNG
    assert real_content_type(png, "image/png; charset=binary") == PNG
    assert real_content_type(inkml_page([STROKE]), "application/xml") == INKML
    with pytest.raises(DecodeError) as caught:
        real_content_type(png, "image/jpeg")
    assert (caught.value.code, caught.value.http_status) == ("CONTENT_TYPE_MISMATCH", 415)
    with pytest.raises(DecodeError) as caught:
        real_content_type(png, "application/pdf")
    assert (caught.value.code, caught.value.http_status) == ("UNSUPPORTED_MEDIA_TYPE", 415)
    with pytest.raises(DecodeError) as caught:
        real_content_type(b"GIF89a\x01\x00\x01\x00", "image/gif")
    assert caught.value.http_status == 415
    assert _code(b"", PNG) == ("EMPTY_FILE", 422)
