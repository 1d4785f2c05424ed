"""Generating the prompts: espeak-ng's French voice, then sox to 8 kHz mono 16-bit WAV, Asterisk's native format.

`generate` writes every catalog entry under `asterisk_conf/sounds/fr/` (so `remontee/ask-bureau`
is `asterisk_conf/sounds/fr/remontee/ask-bureau.wav`). A manifest of the texts already rendered
lets a second run redo only what changed. Number words are trimmed of their leading and
trailing silence so that "quatre cent douze", three files, sounds like one number; a code or a
receipt said digit by digit has `remontee/pause` between its digits (`prompts.digit_files`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ivr import prompts
from settings import ROOT

SOUNDS_DIR = ROOT / "asterisk_conf" / "sounds" / "fr"
MANIFEST = ".texts.json"
VOICE = "fr"  # espeak-ng's French (France) voice
SPEED = 150  # words per minute: a little slower than espeak's default, for a phone line
RATE, CHANNELS, BITS = 8000, 1, 16
SILENCE_SECONDS = 0.3
_TRIM = ["silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"]


class SoundToolMissing(RuntimeError):
    pass


def _tools() -> tuple[str, str]:
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    if espeak is None or sox is None:
        raise SoundToolMissing("espeak-ng and sox are needed: `make setup` installs them (Debian packages)")
    return espeak, sox


def path_for(name: str, directory: Path = SOUNDS_DIR) -> Path:
    return directory / f"{name}.wav"


def render(name: str, text: str | None, directory: Path = SOUNDS_DIR) -> Path:
    """Write one sound: `text` spoken in French, or a short silence when `text` is None."""
    espeak, sox = _tools()
    out = path_for(name, directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".tmp.wav")
    wav = ["-r", str(RATE), "-c", str(CHANNELS), "-b", str(BITS), "-e", "signed-integer"]
    if text is None:
        subprocess.run([sox, "-n", *wav, str(partial), "trim", "0", str(SILENCE_SECONDS)], check=True,
                       capture_output=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            spoken = Path(tmp) / "speech.wav"
            subprocess.run([espeak, "-v", VOICE, "-s", str(SPEED), "-w", str(spoken), text], check=True,
                           capture_output=True)
            effects = _TRIM if name.startswith(prompts.NUMBERS) else []
            subprocess.run([sox, str(spoken), *wav, str(partial), *effects], check=True, capture_output=True)
    partial.replace(out)  # never a half-written file where Asterisk looks
    return out


def generate(
    entries: Mapping[str, str | None] | None = None,
    directory: Path = SOUNDS_DIR,
    *,
    only: Iterable[str] | None = None,
    force: bool = False,
    jobs: int = 4,
) -> list[str]:
    """Render the catalog (or the `only` names of it); the names written, skipping unchanged ones."""
    entries = dict(prompts.catalog() if entries is None else entries)
    if only is not None:
        wanted = set(only)
        unknown = wanted - set(entries)
        if unknown:
            raise KeyError(f"not in the prompt catalog: {', '.join(sorted(unknown))}")
        entries = {k: v for k, v in entries.items() if k in wanted}
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    manifest: dict[str, str | None] = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    todo = [name for name, text in entries.items()
            if force or name not in manifest or manifest[name] != text or not path_for(name, directory).exists()]
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # each render is two subprocesses
        list(pool.map(lambda name: render(name, entries[name], directory), todo))
    manifest.update({name: entries[name] for name in todo})
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
    return todo
