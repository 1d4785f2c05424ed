"""Every crash the fuzz targets (fuzz/) found, with its exact input, and the same bug pinned directly.

Each `*_INPUT` is the crashing file libFuzzer wrote (var/fuzz/crashes/<target>/), replayed through
the target that found it; the target decodes it as of the commit that added it, so the direct
test next to it states the bug in plain terms in case a target's input layout changes later.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from pen_helpers import inkml_page, signed_upload
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from fuzz import agi as agi_target
from fuzz import image as image_target
from fuzz import inkml as inkml_target
from fuzz.seeds import seed_images
from fuzz.upload import STATION, UploadTarget
from ivr.agi import AGIChannel, FastAGIFactory, ProtocolViolation, parse_reply
from pen_gateway.decode import INKML, DecodeError, decode_upload, probe_upload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFFs below

CRASHES = Path(__file__).resolve().parent / "fuzz_crashes"  # crashing inputs too long to quote here
ENV = b"agi_network: yes\nagi_network_script: results\nagi_uniqueid: 1318183200.7\n\n"


class OneCall:
    """One AGIChannel on a StringTransport whose application is the test itself."""

    def __init__(self) -> None:
        self.channels: list[AGIChannel] = []
        self.done: defer.Deferred[None] = defer.Deferred()
        self.factory = FastAGIFactory({"results": self._app}, clock=Clock())
        self.channel = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(ENV)

    def _app(self, channel: AGIChannel) -> defer.Deferred[None]:
        self.channels.append(channel)
        return self.done


def outcome(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


# --- FastAGI (fuzz/agi.py) ---

# 1. `200 result=0 endpos=--1`: "--1".lstrip("-").isdigit() was True and int("--1") raised ValueError out of
#    dataReceived (so did "endpos=²", which str.isdigit() accepts, and an endpos of 5,000 digits).
AGI_ENDPOS_INPUT = (
    b"\x01\x03\x01E\x07\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x1a/01234567" + b"\xff" * 22 + b"\x00" * 4 + b"\xff" * 17
    + b"\x00" * 55 + b"\xff\x01\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a"
    b"\x1b\x1c\x1d\x1f\x1e! \"#\x04%&" + b"\xff" * 15 + b"'()*#,-./012" + b"\x00" * 41 + b"3456789\xff:\xff\xff\xff"
)
# 2. `200 result=777...7` (hundreds of digits) answering WAIT FOR DIGIT: chr() raised OverflowError (ValueError for
#    1114112) into the application, where only AGIError may come.
AGI_KEY_CODE_INPUT = b"\x01\"#$%&'()*+,-.4\x01\x03\x01\x07\x00#$%&4("


@pytest.mark.parametrize("data", [AGI_ENDPOS_INPUT, AGI_KEY_CODE_INPUT], ids=["endpos", "key-code"])
def test_agi_crashing_inputs_replay_clean(data: bytes) -> None:
    agi_target.test_one_input(data)


@pytest.mark.parametrize("endpos", ["--1", "\u00b2", "\u0663", "9" * 5000, "-", "1e3", "0x10"])
def test_an_endpos_that_is_not_ascii_digits_is_ignored(endpos: str) -> None:
    reply = parse_reply(f"200 result=0 endpos={endpos}")
    assert reply is not None and reply.result == "0" and reply.endpos is None
    call = OneCall()
    d = call.channels[0].stream_file("remontee/welcome", "#")
    call.channel.dataReceived(f"200 result=0 endpos={endpos}\n".encode())
    assert outcome(d).endpos is None and not call.transport.disconnecting


def test_an_ordinary_endpos_still_parses() -> None:
    assert parse_reply("200 result=0 endpos=16000").endpos == 16000  # type: ignore[union-attr]
    assert parse_reply("200 result=0 endpos=-5").endpos == -5  # type: ignore[union-attr]


@pytest.mark.parametrize("code", [b"128", b"1114112", b"99999999999999999999", b"7" * 300])
def test_a_key_code_past_ascii_is_a_protocol_violation(code: bytes) -> None:
    call = OneCall()
    channel = call.channels[0]
    d = channel.wait_for_digit(5000)
    call.channel.dataReceived(b"200 result=" + code + b"\n")
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(ProtocolViolation)
    # A violation like any other: counted, and this connection closed (the next command fails at once).
    assert call.transport.disconnecting and call.factory.stats.violations == 1
    assert isinstance(outcome(channel.stream_file("remontee/welcome", "#")), Failure)


# --- InkML (fuzz/inkml.py) ---

# 3. `<?xml version="1.0" encoding="idna"?>`: expat's unknown-encoding handler let LookupError (foo, rot13, hex)
#    and ValueError ("multi-byte encodings are not supported": shift_jis, utf-7, utf-32; idna's UnicodeError)
#    out of decode_upload, where only DecodeError may come (the upload endpoint answered 500).
INKML_ENCODING_INPUT = b"\xff" * 35 + b"'" + b"\xff" * 31 + b"\x80\x7f~}|{zy"


def test_inkml_crashing_input_replays_clean() -> None:
    inkml_target.test_one_input(INKML_ENCODING_INPUT)


@pytest.mark.parametrize("encoding", ["idna", "shift_jis", "utf-7", "UTF-32", "cp932", "foo", "rot13", "hex"])
def test_an_inkml_in_an_unusable_encoding_is_refused_as_bad_inkml(encoding: str) -> None:
    document = inkml_page([[(10.0, 20.0), (11.0, 21.0)]])
    document = document.replace(b'encoding="UTF-8"', f'encoding="{encoding}"'.encode())
    for check in (decode_upload, probe_upload):
        with pytest.raises(DecodeError) as raised:
            check(document, INKML)
        assert raised.value.code == "BAD_INKML" and raised.value.http_status == 422
        assert "encoding" in raised.value.message


@pytest.fixture(scope="module")
def upload_target(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Any:
    target = UploadTarget(Path(tmp_path_factory.mktemp("fuzz-regressions")) / "var", redis_server.url)
    yield target
    target.close()


def test_the_upload_endpoint_answers_422_to_an_inkml_in_shift_jis_and_keeps_nothing(upload_target: Any) -> None:
    document = inkml_page([[(10.0, 20.0)]]).replace(b'encoding="UTF-8"', b'encoding="shift_jis"')
    body, headers = signed_upload(STATION, upload_target.secret, document, INKML, "PEN-0042")
    before = upload_target.state()
    response = upload_target.client.post("/api/v1/uploads", data=body, headers=headers)
    assert response.status_code == 422 and response.get_json()["code"] == "BAD_INKML"
    assert upload_target.state() == before


# --- images (fuzz/image.py) ---

# 4. A two-page TIFF whose second IFD names compression 64001: probe_upload walks the IFD chain
#    (`n_frames`) and Pillow looked the code up in its table, raising KeyError (a 500 at the endpoint).
def test_image_crashing_input_replays_clean() -> None:
    image_target.test_one_input((CRASHES / "image-tiff-unknown-compression-in-second-ifd").read_bytes())


def _second_ifd_compression(tiff: bytes, code: int) -> bytes:
    """The little-endian TIFF with its second IFD's Compression tag (259, a SHORT) set to `code`."""
    first = struct.unpack("<I", tiff[4:8])[0]
    count = struct.unpack("<H", tiff[first : first + 2])[0]
    second = struct.unpack("<I", tiff[first + 2 + 12 * count : first + 6 + 12 * count])[0]
    for i in range(struct.unpack("<H", tiff[second : second + 2])[0]):
        entry = second + 2 + 12 * i
        if struct.unpack("<H", tiff[entry : entry + 2])[0] == 259:
            return tiff[: entry + 8] + struct.pack("<HH", code, 0) + tiff[entry + 12 :]
    raise AssertionError("no Compression tag in the second IFD")


@pytest.mark.parametrize("code", [64001, 65535, 40000])
def test_a_tiff_page_with_an_unknown_compression_is_a_corrupt_image(code: int) -> None:
    tiff = _second_ifd_compression(seed_images()["two-pages.tif"], code)
    with pytest.raises(DecodeError) as raised:
        probe_upload(tiff, "image/tiff")
    assert raised.value.code == "CORRUPT_IMAGE" and raised.value.http_status == 422


def test_the_upload_endpoint_answers_422_to_that_tiff_and_keeps_nothing(upload_target: Any) -> None:
    tiff = _second_ifd_compression(seed_images()["two-pages.tif"], 64001)
    body, headers = signed_upload(STATION, upload_target.secret, tiff, "image/tiff", "PEN-0042")
    before = upload_target.state()
    response = upload_target.client.post("/api/v1/uploads", data=body, headers=headers)
    assert response.status_code == 422 and response.get_json()["code"] == "CORRUPT_IMAGE"
    assert upload_target.state() == before


# 5. A TIFF whose XResolution (tag 282) is stored as the text "\x01": decode_upload turned the dpi into a float
#    outside its error handling and raised ValueError. A rational with a zero denominator (NaN) or a negative
#    resolution came through as the page's dpi.
def test_dpi_crashing_input_replays_clean() -> None:
    image_target.test_one_input((CRASHES / "image-tiff-xresolution-as-text").read_bytes())


def _first_ifd_tag(tiff: bytes, tag: int, kind: int, value: bytes) -> bytes:
    """The little-endian TIFF with its first IFD's `tag` rewritten as one value of TIFF type `kind`.

    Values of 4 bytes or fewer sit in the entry; a rational's 8 bytes go at the end of the file."""
    first = struct.unpack("<I", tiff[4:8])[0]
    for i in range(struct.unpack("<H", tiff[first : first + 2])[0]):
        entry = first + 2 + 12 * i
        if struct.unpack("<H", tiff[entry : entry + 2])[0] == tag:
            inline = value if len(value) <= 4 else struct.pack("<I", len(tiff))
            patched = tiff[: entry + 2] + struct.pack("<HI", kind, 1) + inline.ljust(4, b"\0") + tiff[entry + 12 :]
            return patched + (value if len(value) > 4 else b"")
    raise AssertionError(f"no tag {tag} in the first IFD")


@pytest.mark.parametrize(
    ("kind", "value"),
    [(2, b"\x01"), (5, struct.pack("<II", 300, 0)), (10, struct.pack("<ii", -300, 1)), (5, struct.pack("<II", 0, 1))],
    ids=["text", "zero-denominator", "negative", "zero"],
)
def test_a_resolution_that_is_not_a_positive_number_gives_no_dpi(kind: int, value: bytes) -> None:
    tiff = _first_ifd_tag(seed_images()["gray-lzw.tif"], 282, kind, value)
    page = decode_upload(tiff, "image/tiff")
    assert page.dpi is None and page.image is not None and page.image.shape == (28, 40)


def test_a_stated_resolution_is_still_read() -> None:
    assert decode_upload(seed_images()["gray-lzw.tif"], "image/tiff").dpi == pytest.approx(300, abs=0.01)
    assert decode_upload(seed_images()["rgb-progressive.jpg"], "image/jpeg").dpi == 200


# 6. Nested traceGroups with a contextRef: each group scanned all its descendants, so the work grew with the
#    square of the depth (12,000 groups, 0.5 MB of InkML: 11 s of one worker's CPU; a 20 MB upload, hours).
#    Found by a structure-aware probe of the InkML target's check beyond libFuzzer's 4 KB inputs. This test
#    cannot fail on time (tests assert no timings); with the quadratic walk back it takes minutes, not 0.2 s.
def test_deeply_nested_trace_groups_decode_in_one_walk() -> None:
    depth = 40_000
    document = (b'<ink xmlns="http://www.w3.org/2003/InkML"><definitions><context xml:id="c"><traceFormat>'
                b'<channel name="X" units="cm"/><channel name="Y" units="cm"/></traceFormat></context></definitions>'
                + b'<traceGroup contextRef="#c">' * depth + b"<trace>1 2, 3 4</trace>" + b"</traceGroup>" * depth
                + b"</ink>")
    page = decode_upload(document, INKML)
    assert [s.tolist() for s in page.strokes] == [[[10.0, 20.0], [30.0, 40.0]]]


def test_a_trace_takes_its_own_context_else_its_nearest_group_s_in_document_order() -> None:
    document = (b'<ink xmlns="http://www.w3.org/2003/InkML">'
                b'<traceFormat><channel name="X"/><channel name="Y"/></traceFormat><definitions>'  # default: mm
                b'<context xml:id="cm"><traceFormat><channel name="X" units="cm"/><channel name="Y" units="cm"/>'
                b'</traceFormat></context>'
                b'<context xml:id="in"><traceFormat><channel name="X" units="in"/><channel name="Y" units="in"/>'
                b'</traceFormat></context></definitions>'
                b"<trace>1 1</trace>"
                b'<traceGroup contextRef="#cm"><trace>1 1</trace>'
                b'<traceGroup contextRef="#in"><trace>1 1</trace><trace contextRef="#cm">2 2</trace></traceGroup>'
                b"<traceGroup><trace>3 3</trace></traceGroup></traceGroup><trace>4 4</trace></ink>")
    page = decode_upload(document, INKML)
    assert [s[0].tolist() for s in page.strokes] == [[1.0, 1.0], [10.0, 10.0], [25.4, 25.4], [20.0, 20.0],
                                                     [30.0, 30.0], [4.0, 4.0]]
