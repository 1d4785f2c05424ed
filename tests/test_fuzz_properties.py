"""Property-based tests (hypothesis) of the four fuzzed surfaces, with the fuzz targets' own invariants.

The coverage-guided runs (fuzz/run.py, atheris) are too long for the test suite; these run the same
`check_*` functions on a modest number of hypothesis-made inputs on every `make test`, plus a few
properties that need hypothesis' own strategies (pages drawn with Pillow, strokes of any float).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fuzz import agi as agi_target
from fuzz import image as image_target
from fuzz import inkml as inkml_target
from fuzz.agi import OPERATIONS, Scenario, check_reply_line, check_scenario
from fuzz.image import check_image
from fuzz.inkml import check_inkml
from fuzz.upload import UploadTarget, request_from_bytes
from ivr.agi import ProtocolViolation, parse_reply
from pen_gateway.decode import INKML, MM_PER_UNIT, DecodeError, decode_upload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on every corrupt EXIF block

FAST = settings(max_examples=150, deadline=None)
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ENV_BLOCK = (b"agi_network: yes\nagi_network_script: results\nagi_uniqueid: 1318183200.7\n"
             b"agi_callerid: 0612345678\nagi_accountcode: \n\n")
ANSWER_LINES = st.sampled_from([
    b"200 result=0", b"200 result=1", b"200 result=-1", b"200 result=55", b"200 result=1234 (timeout)",
    b"200 result= (timeout)", b"200 result=0 endpos=16000", b"100 result=0 Trying...", b"HANGUP",
    b"510 Invalid or unknown command", b"511 Command Not Permitted on a dead channel or intercept routine",
    b"520-Invalid command syntax.  Proper usage follows:", b"Usage: x", b"520 End of proper usage.",
    b"200 result=1 (a (nested) value)", b"200 result=99999", b"200 result=x",
])


# --- FastAGI ---

@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    lines = draw(st.lists(st.one_of(ANSWER_LINES, st.binary(max_size=40)), max_size=12))
    terminators = st.sampled_from([b"\n", b"\r\n", b"\r", b""])
    stream = (ENV_BLOCK if draw(st.booleans()) else draw(st.binary(max_size=80))) + b"".join(
        line + draw(terminators) for line in lines)
    return Scenario(
        stream=stream,
        cuts=draw(st.lists(st.integers(1, 64), min_size=1, max_size=4)),
        advances=draw(st.lists(st.sampled_from([0.0, 1.0, 11.0, 61.0, 200.0]), min_size=1, max_size=3)),
        plan=draw(st.lists(st.tuples(st.sampled_from(OPERATIONS), st.booleans()), max_size=8)),
        max_line=draw(st.sampled_from([32, 128, 8192])),
        final_advance=draw(st.sampled_from([0.0, 400.0])),
    )


@FAST
@given(scenarios())
def test_agi_scenarios_keep_the_protocol_invariants(scenario: Scenario) -> None:
    check_scenario(scenario)


@FAST
@given(st.binary(max_size=400))
def test_agi_fuzz_inputs_keep_the_protocol_invariants(data: bytes) -> None:
    agi_target.test_one_input(data)


@FAST
@given(st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=6))
def test_a_call_that_answers_every_command_gets_a_typed_value_for_each(operations: list[str]) -> None:
    # "200 result=1" is a fine answer to every command: no error, the connection stays up until the app ends.
    # One answer per packet, as Asterisk sends them: each after its command.
    answered = [op for op in operations if op != "when_hung_up"]
    stream = ENV_BLOCK + b"200 result=1\n" * len(answered)
    outcome = check_scenario(Scenario(stream, cuts=[len(ENV_BLOCK)] + [13] * len(answered),
                                      plan=[(op, op != "when_hung_up") for op in operations]))
    assert outcome.started and outcome.violations == 0 and not outcome.errors
    assert [op for op, _ in outcome.values if op != "when_hung_up"] == answered


@FAST
@given(st.text(max_size=120))
@example("200 result=0 endpos=²")
def test_parse_reply_never_raises(line: str) -> None:
    reply = parse_reply(line)
    assert reply is None or (reply.raw == line and (reply.endpos is None or isinstance(reply.endpos, int)))
    check_reply_line(line.encode("utf-8", "surrogatepass")[:200])


@FAST
@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_a_key_code_is_a_character_or_a_protocol_violation(code: int) -> None:
    from ivr.agi import _digit

    try:
        key = _digit(code)
    except ProtocolViolation:
        assert code > 127
    else:
        assert key is None if code <= 0 else (len(key) == 1 and key.isascii())  # type: ignore[arg-type]


# --- InkML ---

@FAST
@given(st.binary(max_size=600))
def test_inkml_fuzz_inputs_only_ever_raise_decode_error(data: bytes) -> None:
    inkml_target.test_one_input(bytes([1]) + data)  # structure-aware: a valid-ish document from the bytes


@FAST
@given(st.binary(max_size=300), st.sampled_from([INKML, None, "text/xml"]))
def test_raw_bytes_as_inkml_only_ever_raise_decode_error(data: bytes, declared: str | None) -> None:
    check_inkml(b'<?xml version="1.0"?><ink xmlns="http://www.w3.org/2003/InkML">' + data, declared)
    check_inkml(data, declared)


@FAST
@given(
    st.lists(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True, width=64),
                                st.floats(allow_nan=True, allow_infinity=True, width=64)), min_size=1, max_size=6),
             min_size=1, max_size=4),
    st.sampled_from(["mm", "cm", "in", None]),
)
def test_strokes_come_back_in_millimetres_or_the_page_is_refused(strokes: list[list[tuple[float, float]]],
                                                                 units: str | None) -> None:
    unit_attr = f' units="{units}"' if units else ""
    traces = "".join("<trace>" + ", ".join(f"{x!r} {y!r}" for x, y in points) + "</trace>" for points in strokes)
    document = (f'<ink xmlns="http://www.w3.org/2003/InkML"><traceFormat><channel name="X"{unit_attr}/>'
                f'<channel name="Y"{unit_attr}/></traceFormat>{traces}</ink>').encode()
    check_inkml(document)
    scale = MM_PER_UNIT[units or "mm"]
    finite = all(math.isfinite(v * scale) for points in strokes for x, y in points for v in (x, y))
    try:
        page = decode_upload(document, INKML)
    except DecodeError as exc:
        assert not finite, f"finite strokes refused: {exc.message}"
        return
    assert finite
    assert [s.tolist() for s in page.strokes] == [[[x * scale, y * scale] for x, y in points] for points in strokes]


# --- images ---

@FAST
@given(st.binary(max_size=120))
def test_mutated_seed_images_only_ever_raise_decode_error(data: bytes) -> None:
    image_target.test_one_input(bytes([1]) + data)


@FAST
@given(st.binary(max_size=200), st.sampled_from([None, "image/png", "image/jpeg", "image/tiff"]))
def test_raw_bytes_as_an_image_only_ever_raise_decode_error(data: bytes, declared: str | None) -> None:
    for magic in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*"):
        check_image(magic + data, declared)


@SLOW
@given(
    st.integers(1, 64), st.integers(1, 64),
    st.sampled_from(["L", "RGB", "RGBA", "1", "P", "I;16", "CMYK", "LA"]),
    st.sampled_from(["PNG", "JPEG", "TIFF"]),
    st.integers(0, 2**32 - 1),
)
def test_any_small_page_pillow_writes_decodes_to_its_own_size(width: int, height: int, mode: str, fmt: str,
                                                              seed: int) -> None:
    if fmt == "JPEG" and mode not in ("L", "RGB", "CMYK"):
        mode = "L"
    if fmt == "PNG" and mode == "CMYK":
        mode = "RGB"
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").convert(mode).save(buffer, fmt)
    data = buffer.getvalue()
    check_image(data)
    page = decode_upload(data, None)
    assert page.image is not None and page.image.shape == (height, width)


# --- the upload endpoint ---

@pytest.fixture(scope="module")
def upload_target(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Any:
    target = UploadTarget(Path(tmp_path_factory.mktemp("fuzz-upload")) / "var", redis_server.url)
    yield target
    target.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80))
@example(b"")  # the well-formed request: a 202
def test_signed_uploads_answer_a_documented_status_and_a_refusal_changes_nothing(upload_target: Any,
                                                                                  data: bytes) -> None:
    upload_target.check(request_from_bytes(data, upload_target.secret))


def test_the_upload_property_reaches_both_acceptance_and_refusal(upload_target: Any) -> None:
    """The property above is only worth something if its inputs reach the deep end: check that they do."""
    for data in (b"", bytes(6) + bytes([3]), b"\x00\xff", bytes(17) + b"\xff"):
        upload_target.check(request_from_bytes(data, upload_target.secret))
    assert upload_target.statuses.get(202, 0) >= 1
    assert sum(n for status, n in upload_target.statuses.items() if status != 202) >= 1
