"""A realistic demo registry: real departments and prefectures, plausible communes, PINs in a separate file.

Bureau codes are the department number, a commune number and a bureau number (`750120`:
Paris, commune 01, bureau 20), so every code is digits only and keyable on a phone.
"""

from __future__ import annotations

import csv
import os
import random
import secrets
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from registry.bureaux import Bureau, write_registry
from registry.pins import DEFAULT_N, hash_pin

DEPARTMENTS = {
    "01": ("Ain", "Bourg-en-Bresse"), "02": ("Aisne", "Laon"), "03": ("Allier", "Moulins"),
    "04": ("Alpes-de-Haute-Provence", "Digne-les-Bains"), "05": ("Hautes-Alpes", "Gap"),
    "06": ("Alpes-Maritimes", "Nice"), "07": ("Ardèche", "Privas"), "08": ("Ardennes", "Charleville-Mézières"),
    "09": ("Ariège", "Foix"), "10": ("Aube", "Troyes"), "11": ("Aude", "Carcassonne"),
    "12": ("Aveyron", "Rodez"), "13": ("Bouches-du-Rhône", "Marseille"), "14": ("Calvados", "Caen"),
    "15": ("Cantal", "Aurillac"), "16": ("Charente", "Angoulême"), "17": ("Charente-Maritime", "La Rochelle"),
    "18": ("Cher", "Bourges"), "19": ("Corrèze", "Tulle"), "21": ("Côte-d'Or", "Dijon"),
    "22": ("Côtes-d'Armor", "Saint-Brieuc"), "23": ("Creuse", "Guéret"), "24": ("Dordogne", "Périgueux"),
    "25": ("Doubs", "Besançon"), "26": ("Drôme", "Valence"), "27": ("Eure", "Évreux"),
    "28": ("Eure-et-Loir", "Chartres"), "29": ("Finistère", "Quimper"), "30": ("Gard", "Nîmes"),
    "31": ("Haute-Garonne", "Toulouse"), "32": ("Gers", "Auch"), "33": ("Gironde", "Bordeaux"),
    "34": ("Hérault", "Montpellier"), "35": ("Ille-et-Vilaine", "Rennes"), "36": ("Indre", "Châteauroux"),
    "37": ("Indre-et-Loire", "Tours"), "38": ("Isère", "Grenoble"), "39": ("Jura", "Lons-le-Saunier"),
    "40": ("Landes", "Mont-de-Marsan"), "41": ("Loir-et-Cher", "Blois"), "42": ("Loire", "Saint-Étienne"),
    "43": ("Haute-Loire", "Le Puy-en-Velay"), "44": ("Loire-Atlantique", "Nantes"), "45": ("Loiret", "Orléans"),
    "46": ("Lot", "Cahors"), "47": ("Lot-et-Garonne", "Agen"), "48": ("Lozère", "Mende"),
    "49": ("Maine-et-Loire", "Angers"), "50": ("Manche", "Saint-Lô"), "51": ("Marne", "Châlons-en-Champagne"),
    "52": ("Haute-Marne", "Chaumont"), "53": ("Mayenne", "Laval"), "54": ("Meurthe-et-Moselle", "Nancy"),
    "55": ("Meuse", "Bar-le-Duc"), "56": ("Morbihan", "Vannes"), "57": ("Moselle", "Metz"),
    "58": ("Nièvre", "Nevers"), "59": ("Nord", "Lille"), "60": ("Oise", "Beauvais"), "61": ("Orne", "Alençon"),
    "62": ("Pas-de-Calais", "Arras"), "63": ("Puy-de-Dôme", "Clermont-Ferrand"),
    "64": ("Pyrénées-Atlantiques", "Pau"), "65": ("Hautes-Pyrénées", "Tarbes"),
    "66": ("Pyrénées-Orientales", "Perpignan"), "67": ("Bas-Rhin", "Strasbourg"), "68": ("Haut-Rhin", "Colmar"),
    "69": ("Rhône", "Lyon"), "70": ("Haute-Saône", "Vesoul"), "71": ("Saône-et-Loire", "Mâcon"),
    "72": ("Sarthe", "Le Mans"), "73": ("Savoie", "Chambéry"), "74": ("Haute-Savoie", "Annecy"),
    "75": ("Paris", "Paris"), "76": ("Seine-Maritime", "Rouen"), "77": ("Seine-et-Marne", "Melun"),
    "78": ("Yvelines", "Versailles"), "79": ("Deux-Sèvres", "Niort"), "80": ("Somme", "Amiens"),
    "81": ("Tarn", "Albi"), "82": ("Tarn-et-Garonne", "Montauban"), "83": ("Var", "Toulon"),
    "84": ("Vaucluse", "Avignon"), "85": ("Vendée", "La Roche-sur-Yon"), "86": ("Vienne", "Poitiers"),
    "87": ("Haute-Vienne", "Limoges"), "88": ("Vosges", "Épinal"), "89": ("Yonne", "Auxerre"),
    "90": ("Territoire de Belfort", "Belfort"), "91": ("Essonne", "Évry-Courcouronnes"),
    "92": ("Hauts-de-Seine", "Nanterre"), "93": ("Seine-Saint-Denis", "Bobigny"),
    "94": ("Val-de-Marne", "Créteil"), "95": ("Val-d'Oise", "Cergy"),
}
_SAINTS = ("Saint-Martin", "Saint-Pierre", "Saint-Laurent", "Sainte-Marie", "Saint-Jean", "Saint-Germain")
_PLACES = ("Villeneuve", "Montigny", "Beaumont", "Fontaine", "Bois-Colombes", "Champagne", "Roche", "Neuville")
_SUFFIXES = ("sur-Loire", "en-Brie", "les-Bains", "sur-Mer", "la-Forêt", "le-Château", "de-Provence", "sur-Seine")
_PLACES_OF_VOTE = ("École Jules-Ferry", "Mairie", "Salle des fêtes", "Gymnase municipal", "École Jean-Jaurès",
                   "Maison des associations", "Groupe scolaire Victor-Hugo", "Centre culturel")


def _commune_name(rng: random.Random, prefecture: str, index: int) -> str:
    if index == 1:
        return prefecture
    stem = rng.choice(_SAINTS + _PLACES)
    return f"{stem}-{rng.choice(_SUFFIXES)}"


def _unique(rng: random.Random, used: set[str], make: Callable[[], str]) -> str:
    while (value := make()) in used:
        pass
    used.add(value)
    return value


def demo_bureaux(count: int, seed: int = 2011) -> list[tuple[str, str, str, str, int, str, str]]:
    """(code, name, commune, department, inscrits, caller_id, pen_serial) for `count` bureaux."""
    rng = random.Random(seed)
    departments = list(DEPARTMENTS)
    rows = []
    used: set[str] = set()
    # Round-robin over departments so that even a small demo spans the country.
    per_department: dict[str, int] = {}
    for i in range(count):
        dept = departments[i % len(departments)]
        n = per_department.get(dept, 0)
        per_department[dept] = n + 1
        commune_no, bureau_no = n // 20 + 1, n % 20 + 1
        if commune_no > 99:
            raise ValueError("too many bureaux for the demo code scheme (at most 188,100)")
        dept_name, prefecture = DEPARTMENTS[dept]
        commune = _commune_name(random.Random(f"{seed}-{dept}-{commune_no}"), prefecture, commune_no)
        code = f"{dept}{commune_no:02d}{bureau_no:02d}"
        name = f"Bureau {bureau_no} — {rng.choice(_PLACES_OF_VOTE)}"
        inscrits = rng.randint(300, 1400)
        caller_id = _unique(rng, used, lambda: f"06{rng.randrange(10**8):08d}")
        pen_serial = _unique(rng, used, lambda: f"AJX-{rng.randrange(16**6):06X}")
        rows.append((code, name, commune, f"{dept} {dept_name}", inscrits, caller_id, pen_serial))
    return rows


def generate(count: int, registry_out: Path, pins_out: Path, scrypt_n: int = DEFAULT_N, seed: int = 2011) -> int:
    """Write a registry of `count` bureaux and the PINs file; returns the number written."""
    rows = demo_bureaux(count, seed)
    pins = [f"{secrets.randbelow(10**6):06d}" for _ in rows]
    with ProcessPoolExecutor() as pool:
        hashes = list(pool.map(partial(hash_pin, n=scrypt_n), pins, chunksize=64))
    bureaux = [
        Bureau(code, name, commune, dept, inscrits, pin_hash, (caller_id,), (pen,))
        for (code, name, commune, dept, inscrits, caller_id, pen), pin_hash in zip(rows, hashes, strict=True)
    ]
    registry_out.parent.mkdir(parents=True, exist_ok=True)
    write_registry(registry_out, bureaux)
    pins_out.parent.mkdir(parents=True, exist_ok=True)
    # The PINs in clear: a new file, its owner's only from its creation whatever the umask, then renamed over
    # the old one (whose readers, had it been readable, keep the old inode and never see these PINs).
    temporary = pins_out.with_name(f".{pins_out.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("bureau", "pin"))
            writer.writerows((b.code, pin) for b, pin in zip(bureaux, pins, strict=True))
        os.replace(temporary, pins_out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return len(bureaux)
