"""Every French prompt the call flow plays, by its Asterisk sound name, and the speech of numbers.

A sound name is what `STREAM FILE` and `GET DATA` are given: `remontee/ask-bureau` is the file
`asterisk_conf/sounds/fr/remontee/ask-bureau.wav`. The names that ask for a value are a contract
with DESIGN.md (`remontee/ask-bureau`, `remontee/ask-pin`, `remontee/ask-<field>`,
`remontee/ask-votes-<candidate>`, `remontee/ask-confirm...`); the others are ours.

Numbers are said from word files: `num2words(n, lang="fr")` writes French numbers correctly
(soixante et onze, quatre-vingts, quatre-vingt-un, deux cents, deux cent un, mille), and its
words, split at the blanks, are the files. A file is said alone, though, and a few words sound
otherwise before the next one: six, dix and huit lose their final consonant before cent and mille
("six cents" /si sɑ̃/, "dix mille" /di mil/, not /sis/, /dis/), and vingt is linked to "et"
(/vɛ̃t e œ̃/). Such a word is said in one file with the word after it ("six cents", "dix mille",
"vingt et un"); 124 files say every count from 0 to 99,999, and three more the feminine of
un for the minutes of a lock (une, vingt et une, quatre-vingt-une).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from functools import cache

from num2words import num2words

from forms.definitions import DEFAULT_ELECTIONS_DIR, CountField, Election, available_elections, load_election

PREFIX = "remontee/"
NUMBERS = PREFIX + "nombres/"
MAX_SPOKEN_NUMBER = 99_999

# Fixed prompts. `None` as text is a generated sound rather than speech.
WELCOME = PREFIX + "bienvenue"
ASK_BUREAU = PREFIX + "ask-bureau"
BUREAU = PREFIX + "le-bureau"
UNKNOWN = PREFIX + "est-inconnu"
ASK_PIN = PREFIX + "ask-pin"
PIN_WRONG = PREFIX + "code-incorrect"
BUREAU_LOCKED = PREFIX + "bureau-verrouille"
CALLER_LOCKED = PREFIX + "appelant-verrouille"
MINUTE = PREFIX + "minute"  # after a lock's prompt and its duration (`minutes_files`)
MINUTES = PREFIX + "minutes"
TO_OPERATOR = PREFIX + "transfert-operateur"
ALREADY_REPORTED = PREFIX + "deja-transmis"
ASK_CONFIRM_CORRECTION = PREFIX + "ask-confirm-correction"
RESUME_OFFER = PREFIX + "reprise"
ASK_CONFIRM_RESUME = PREFIX + "ask-confirm-reprise"
RESUMED = PREFIX + "reprise-ok"
NOTHING_HEARD = PREFIX + "pas-de-saisie"
INVALID = PREFIX + "saisie-invalide"
TOO_LONG = PREFIX + "trop-de-chiffres"
TOTAL_MISMATCH = PREFIX + "ecart-votants"
SUM_MISMATCH = PREFIX + "ecart-exprimes"
OVER_REGISTERED = PREFIX + "plus-que-inscrits"
GAP_OF = PREFIX + "ecart-de"
GAP_OF_ONE = PREFIX + "ecart-d-un"  # "de" elides before "un": not GAP_OF then the number
TOO_MANY = PREFIX + "en-trop"
TOO_FEW = PREFIX + "en-moins"
ASK_CONFIRM_MISMATCH = PREFIX + "ask-confirm-ecart"
WHICH_LINE = PREFIX + "quel-nombre"
LINE_FOR = PREFIX + "tapez"
ASK_LINE = PREFIX + "ask-ligne"
READ_BACK = PREFIX + "ask-confirm-recapitulatif"  # a read-back that 1 confirms: DESIGN names it ask-confirm
ASK_CONFIRM_SEND = PREFIX + "ask-confirm-envoi"
RECORDED = PREFIX + "enregistre"
CORRECTION_TO_SUPERVISOR = PREFIX + "correction-superviseur"
TO_SUPERVISOR = PREFIX + "verification-superviseur"
ALREADY_RECEIVED = PREFIX + "deja-recu"
RECEIPT_IS = PREFIX + "numero-de-recu"
I_REPEAT = PREFIX + "je-repete"
GOODBYE = PREFIX + "au-revoir"
TECHNICAL_ERROR = PREFIX + "incident-technique"
SILENCE = PREFIX + "silence"  # the prompt of a GET DATA that goes on reading keys the caller already started
PAUSE = PREFIX + "pause"  # between the digits of a code or a receipt said one by one
CHECKING_PIN = PREFIX + "verification-code"  # while the PIN is checked
SAVING = PREFIX + "enregistrement"  # while the return is journaled
HOLD = PREFIX + "patientez"  # while work goes on past the speech that covered it

FIXED: dict[str, str | None] = {
    WELCOME: "Bienvenue sur le serveur de remontée des résultats.",
    ASK_BUREAU: "Tapez le code de votre bureau de vote, puis la touche dièse. "
                "La touche étoile efface la saisie.",
    BUREAU: "Le bureau",
    UNKNOWN: "est inconnu. Vérifiez le code imprimé sur votre procès-verbal.",
    ASK_PIN: "Tapez le code secret du bureau, puis la touche dièse.",
    PIN_WRONG: "Code secret incorrect.",
    BUREAU_LOCKED: "Trop de codes secrets erronés pour ce bureau : il est bloqué pendant",
    CALLER_LOCKED: "Trop de codes secrets erronés depuis votre numéro : il est bloqué pendant",
    MINUTE: "minute.",
    MINUTES: "minutes.",
    TO_OPERATOR: "Je vous passe un opérateur. Merci de patienter.",
    ALREADY_REPORTED: "Ce bureau a déjà transmis ses résultats.",
    ASK_CONFIRM_CORRECTION: "Pour transmettre une correction, tapez 1. Pour quitter, tapez 2.",
    RESUME_OFFER: "Une saisie interrompue a été conservée pour ce bureau.",
    ASK_CONFIRM_RESUME: "Pour la reprendre là où elle s'est arrêtée, tapez 1. Pour tout recommencer, tapez 2.",
    RESUMED: "Reprise de la saisie.",
    NOTHING_HEARD: "Je n'ai rien entendu.",
    INVALID: "Saisie non valide.",
    TOO_LONG: "Ce nombre a trop de chiffres.",
    TOTAL_MISMATCH: "Attention : les bulletins blancs et nuls plus les suffrages exprimés "
                    "ne font pas le nombre de votants.",
    SUM_MISMATCH: "Attention : la somme des voix des candidats ne fait pas le nombre de suffrages exprimés.",
    OVER_REGISTERED: "Attention : il y a plus de votants que d'inscrits dans ce bureau.",
    GAP_OF: "L'écart est de",
    GAP_OF_ONE: "L'écart est d'un",
    TOO_MANY: "en trop.",
    TOO_FEW: "en moins.",
    ASK_CONFIRM_MISMATCH: "Pour corriger un nombre, tapez 1. Pour tout ressaisir, tapez 2. "
                          "Pour transmettre tel quel à un superviseur, tapez 3.",
    WHICH_LINE: "Quel nombre voulez-vous corriger ?",
    LINE_FOR: "tapez",
    ASK_LINE: "Tapez le numéro du nombre à corriger, puis la touche dièse.",
    READ_BACK: "Récapitulatif. Tapez 1 pour confirmer sans attendre, ou dièse pour passer.",
    ASK_CONFIRM_SEND: "Pour confirmer et transmettre ces résultats, tapez 1. Pour corriger un nombre, tapez 2. "
                      "Pour tout ressaisir, tapez 3.",
    RECORDED: "Vos résultats sont enregistrés. Merci.",
    CORRECTION_TO_SUPERVISOR: "Votre correction est enregistrée. Un superviseur la vérifiera "
                              "avant qu'elle remplace les résultats déjà transmis.",
    TO_SUPERVISOR: "Vos résultats sont enregistrés. Un superviseur les vérifiera.",
    ALREADY_RECEIVED: "Ces résultats avaient déjà été reçus, à l'identique.",
    RECEIPT_IS: "Votre numéro de reçu est le",
    I_REPEAT: "Je répète :",
    GOODBYE: "Au revoir.",
    TECHNICAL_ERROR: "Un incident technique empêche d'enregistrer vos résultats.",
    SILENCE: None,
    PAUSE: None,
    CHECKING_PIN: "Vérification du code.",
    SAVING: "Enregistrement en cours.",
    HOLD: "Veuillez patienter.",
}


def election_title(election: Election) -> str:
    return f"{PREFIX}election-{election.id}"


def ask_field(field: CountField) -> str:
    """The prompt that asks for a count: `remontee/ask-votants`, `remontee/ask-votes-aubry` (DESIGN.md)."""
    return f"{PREFIX}ask-votes-{field.id}" if field.candidate else f"{PREFIX}ask-{field.id}"


def field_name(field: CountField) -> str:
    """The count's name, said in the read-back and the menu of corrections."""
    return f"{PREFIX}nom-{field.id}"


def of(name: str) -> str:
    """`de` before a name, elided before a vowel as French requires: "de Martine Aubry", "d'Arnaud Montebourg".

    An initial h or y is left alone: whether it elides depends on the name (d'Henri, de Hollande)."""
    first = _slug(name[:1]).lower()
    return f"d'{name}" if first and first in "aeiou" else f"de {name}"


def election_prompts(election: Election) -> dict[str, str]:
    prompts = {election_title(election): f"Élection : {election.spoken_title}."}
    for field in election.fields:
        if field.candidate:
            prompts[ask_field(field)] = f"Tapez le nombre de voix {of(field.spoken)}, puis la touche dièse."
        else:
            prompts[ask_field(field)] = f"Tapez {field.spoken}, puis la touche dièse."
        prompts[field_name(field)] = field.spoken
    return prompts


def _slug(word: str) -> str:
    """An ASCII file name for number words: `zéro` → `zero`, `six cents` → `six-cents`."""
    return unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode().replace(" ", "-")


# Words whose final consonant is silent before cent(s) and mille: said in one file with it.
_SILENT_END = ("six", "dix", "huit")


@cache
def number_words(n: int, feminine: bool = False) -> tuple[str, ...]:
    """The French words of `n`, one file each: 71 → ("soixante", "et", "onze"), 610 → ("six cent", "dix").

    `feminine` for a count of a feminine noun: 21 → ("vingt et une",), as in "vingt et une minutes"."""
    if not 0 <= n <= MAX_SPOKEN_NUMBER:
        raise ValueError(f"{n} is outside the spoken range 0..{MAX_SPOKEN_NUMBER}")
    words, said = num2words(n, lang="fr").split(), []
    while words:
        if words[0].endswith(_SILENT_END) and words[1:2] in (["cent"], ["cents"], ["mille"]):
            said.append(" ".join(words[:2]))
            words = words[2:]
        elif words[:2] == ["vingt", "et"]:  # vingt et un, the t heard
            said.append(" ".join(words[:3]))
            words = words[3:]
        else:
            said.append(words.pop(0))
    if feminine and said[-1].endswith("un"):  # un, vingt et un, quatre-vingt-un
        said[-1] += "e"
    return tuple(said)


def number_files(n: int, feminine: bool = False) -> list[str]:
    """The sound files that say `n`: 80 → ["remontee/nombres/quatre-vingts"], 600 → [".../six-cents"]."""
    return [NUMBERS + _slug(w) for w in number_words(n, feminine)]


def minutes_files(seconds: float) -> list[str]:
    """A lock's duration in whole minutes, rounded up: 900 → quinze minutes, 50 → une minute, 1260 → vingt et une."""
    minutes = min(max(1, math.ceil(seconds / 60)), MAX_SPOKEN_NUMBER)
    return [*number_files(minutes, feminine=True), MINUTE if minutes == 1 else MINUTES]


def digit_files(digits: str) -> list[str]:
    """A code or a receipt said digit by digit, a pause between two: "071" → zéro, pause, sept, pause, un.

    The number words are trimmed of their silence so that a number's words run together; digits read one
    by one would run together too ("zérozérozéro"), and the caller writing a receipt down could not count them.
    """
    words = [NUMBERS + _slug(num2words(int(d), lang="fr")) for d in digits if d.isdigit()]
    files = words[:1]
    for word in words[1:]:
        files += [PAUSE, word]
    return files


@cache
def number_prompts() -> dict[str, str]:
    """Every word file needed to say 0..99,999 (and the feminine of un), with the words it says.

    num2words says t*1000 + r as the words of t*1000 then those of r (a test checks it on a
    sample), and no file holds words of both, so 0..999 and the thousands hold every file;
    asking all 100,000 takes seconds.
    """
    words: dict[str, str] = {}
    for n in [*range(1000), *range(1000, MAX_SPOKEN_NUMBER + 1, 1000)]:
        for w in number_words(n) + number_words(n, feminine=True):
            words.setdefault(NUMBERS + _slug(w), w)
    return words


def catalog(elections: Iterable[Election] | None = None) -> dict[str, str | None]:
    """Every sound the flow may play, name → French text (None: generated, not spoken)."""
    if elections is None:
        elections = [load_election(e) for e in available_elections(DEFAULT_ELECTIONS_DIR)]
    entries: dict[str, str | None] = {**FIXED, **number_prompts()}
    for election in elections:
        entries.update(election_prompts(election))
    return entries
