"""The Asterisk configuration agrees with the code: the AGI URL, the contexts, the sounds, the variables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ivr import call_flow
from ivr import prompts as P
from ivr.server import SCRIPT
from settings import Settings

CONF = Path(__file__).resolve().parents[1] / "asterisk_conf"


def parse_conf(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every `key = value` or `key => value` line, as Asterisk's config parser reads them."""
    entries, section = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(?<!\\);.*", "", raw).strip()  # `;` starts a comment unless escaped
        if not line:
            continue
        header = re.match(r"^\[([^\]]+)\](\(.*\))?$", line)
        if header:
            section = header[1]
            continue
        key, sep, value = re.split(r"\s*(=>|=)\s*", line, maxsplit=1) if "=" in line else (line, "", "")
        assert sep, f"{path.name}: unreadable line {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def dialplan() -> dict[str, dict[str, list[str]]]:
    """context → extension → its priorities' application calls, with `same =>` lines expanded."""
    contexts: dict[str, dict[str, list[str]]] = {}
    last: tuple[str, str] | None = None
    for section, key, value in parse_conf(CONF / "extensions.conf"):
        if section in ("general", "globals"):
            continue
        if key == "exten":
            extension, _priority, application = (p.strip() for p in value.split(",", 2))
            contexts.setdefault(section, {}).setdefault(extension, []).append(application)
            last = (section, extension)
        elif key == "same":
            assert last is not None and last[0] == section
            _priority, application = (p.strip() for p in value.split(",", 1))
            contexts[section][last[1]].append(application)
    return contexts


def globals_() -> dict[str, str]:
    return {k: v for s, k, v in parse_conf(CONF / "extensions.conf") if s == "globals"}


def substitute(text: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: globals_().get(m[1], m[0]), text)


def test_the_hotline_calls_the_configured_fastagi_server_then_the_standby() -> None:
    hotline = dialplan()["hotline"]
    agi = [a for a in hotline["s"] if a.startswith("AGI(")]
    defaults = Settings()
    assert agi == [f"AGI(agi://{defaults.bind}:{defaults.agi_port}/{SCRIPT})"]
    assert hotline["s"].index("Answer()") < hotline["s"].index(agi[0])
    assert "Set(CHANNEL(language)=fr)" in hotline["s"]  # the prompts live under sounds/fr/
    after = hotline["s"][hotline["s"].index(agi[0]) + 1 :]
    assert after == ['GotoIf($["${AGISTATUS}" = "FAILURE"]?standby,1)', "Goto(outcome,1)"]
    standby = [a for a in hotline["standby"] if a.startswith("AGI(")]
    assert standby == [f"AGI(agi://{defaults.bind}:{defaults.agi_port + 1}/{SCRIPT})"]
    assert hotline["standby"][-1] == "Goto(outcome,1)"


def test_unreachable_server_and_operator_outcome_go_to_the_operators() -> None:
    hotline = dialplan()["hotline"]
    after = hotline["outcome"]
    branches: dict[tuple[str, str], str] = {}
    for application in after:
        m = re.match(r'GotoIf\(\$\["\$\{(\w+)\}" = "(\w+)"\]\?(\w+),1\)', application)
        if m:
            branches[(m[1], m[2])] = m[3]
    assert branches[("AGISTATUS", "FAILURE")] == "operators"
    assert branches[("REMONTEE_OUTCOME", call_flow.OPERATOR)] == "operators"
    assert branches[("REMONTEE_OUTCOME", call_flow.ACCEPTED)] == "done"
    assert branches[("REMONTEE_OUTCOME", call_flow.DECLINED)] == "done"
    # Any other outcome (none, hangup, a new one) falls through to a human.
    assert after[-1] == "Goto(operators,1)"
    assert {value for variable, value in branches if variable == "REMONTEE_OUTCOME"} <= {
        call_flow.ACCEPTED, call_flow.OPERATOR, call_flow.DECLINED, call_flow.HUNG_UP}
    queue = next(a for a in hotline["operators"] if a.startswith("Queue("))
    queue_name = substitute(queue)[len("Queue("):].split(",")[0]
    assert queue_name in {s for s, _, _ in parse_conf(CONF / "queues.conf")}
    assert any(k == "member" for s, k, _ in parse_conf(CONF / "queues.conf") if s == queue_name)


def _run_extension(context: str, extension: str, variables: dict[str, str]) -> list[str]:
    """The applications an extension runs, in order, following its GotoIf jumps to its own labels."""
    steps: list[tuple[str, str]] = []  # (label, application)
    current = None
    for section, key, value in parse_conf(CONF / "extensions.conf"):
        if section == context and key == "exten":
            current = value.split(",", 1)[0].strip()
            if current == extension:
                steps.append(("", value.split(",", 2)[2].strip()))
        elif section == context and key == "same" and current == extension:
            priority, application = (p.strip() for p in value.split(",", 1))
            label = re.match(r"n\((\w+)\)", priority)
            steps.append((label[1] if label else "", application))
    ran, i = [], 0
    while i < len(steps):
        application = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m[1], ""), steps[i][1])
        ran.append(application)
        jump = re.match(r'GotoIf\(\$\["(.*)" = "(.*)"\]\?(\w+)\)$', application)
        if jump and jump[1] == jump[2]:
            i = next(n for n, (label, _) in enumerate(steps) if label == jump[3])
            continue
        i += 1
    return ran


def test_a_caller_the_ivr_hands_over_hears_the_handoff_once() -> None:
    """The IVR says the handoff itself before setting REMONTEE_OUTCOME=operator; the dialplan says it only for a
    call the IVR could not take (no FastAGI server answered, no outcome)."""
    handoff = f"Playback({P.TO_OPERATOR})"
    for variables in ({"REMONTEE_OUTCOME": call_flow.OPERATOR}, {"AGISTATUS": "FAILURE"}, {}):
        ran = _run_extension("hotline", "operators", variables)
        assert any(a.startswith("Queue(") for a in ran), variables
        assert ran.count(handoff) == (0 if variables.get("REMONTEE_OUTCOME") == call_flow.OPERATOR else 1), ran


def test_every_goto_lands_on_an_extension() -> None:
    contexts = dialplan()
    for context, extensions in contexts.items():
        for applications in extensions.values():
            for application in applications:
                for target in re.findall(r"(?:Goto\(|\?)([\w-]+(?:,[\w-]+)*),1\)", application):
                    parts = target.split(",")
                    where, extension = (parts[0], parts[1]) if len(parts) == 2 else (context, parts[0])
                    assert extension in contexts[where], f"{context}: {application}"


def test_sounds_and_variables_named_in_the_dialplan_exist_in_the_code() -> None:
    catalog = P.catalog()
    text = (CONF / "extensions.conf").read_text(encoding="utf-8")
    played = re.findall(r"Playback\(([^)]+)\)", text)
    assert played and all(name in catalog for p in played for name in p.split("&"))
    variables = set(re.findall(r"\$\{(REMONTEE_\w+)\}", text))
    set_by_the_flow = {call_flow.OUTCOME_VARIABLE, call_flow.RECEIPT_VARIABLE, "REMONTEE_STATUS", "REMONTEE_BUREAU",
                       "REMONTEE_HANDOFF"}
    assert variables <= set_by_the_flow
    flow_source = Path(call_flow.__file__).read_text(encoding="utf-8")
    assert all(v in flow_source for v in set_by_the_flow - {call_flow.OUTCOME_VARIABLE, call_flow.RECEIPT_VARIABLE})


def test_a_caller_waiting_for_an_operator_hears_only_sounds_we_generate() -> None:
    """No Asterisk sound package is installed: the queue's stock announcements and music on hold would be silence."""
    queue = {k: v for s, k, v in parse_conf(CONF / "queues.conf") if s == "operators"}
    assert queue["announce-frequency"] == "0"
    assert queue["announce-holdtime"] == "no" and queue["announce-position"] == "no"
    assert queue["periodic-announce"] in P.catalog() and int(queue["periodic-announce-frequency"]) > 0
    queued = [a for a in dialplan()["hotline"]["operators"] if "Queue(" in a]
    assert queued and all("r" in a.split("Queue(", 1)[1].split(",")[1] for a in queued)  # ringing, not music


def test_the_trunk_lands_in_the_hotline_and_the_manager_listens_on_loopback() -> None:
    contexts = dialplan()
    pjsip = parse_conf(CONF / "pjsip.conf")
    trunk_context = next(v for s, k, v in pjsip if s == "trunk" and k == "context")
    assert trunk_context in contexts and "Goto(hotline,s,1)" in contexts[trunk_context]["_X."]
    assert ("trunk", "dtmf_mode", "rfc4733") in pjsip  # keys as RTP events: what GET DATA reads
    manager = parse_conf(CONF / "manager.conf")
    assert ("general", "bindaddr", "127.0.0.1") in manager


@pytest.mark.parametrize("module", ["res_agi.so", "format_wav.so", "app_queue.so", "chan_pjsip.so",
                                    "app_playback.so", "pbx_config.so"])
def test_modules_the_hotline_needs_are_loaded(module: str) -> None:
    assert ("modules", "load", module) in parse_conf(CONF / "modules.conf")


def test_generated_sounds_are_not_committed() -> None:
    ignored = (CONF.parent / ".gitignore").read_text(encoding="utf-8").split()
    assert "asterisk_conf/sounds/" in ignored
