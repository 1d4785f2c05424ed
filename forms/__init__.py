"""Election definitions and the paper form: one definition drives the IVR menu order and the paper layout."""

from forms.definitions import (
    DEFAULT_ELECTIONS_DIR,
    Candidate,
    CountField,
    Election,
    ElectionDefinitionError,
    available_elections,
    load_election,
)

__all__ = [
    "DEFAULT_ELECTIONS_DIR",
    "Candidate",
    "CountField",
    "Election",
    "ElectionDefinitionError",
    "available_elections",
    "load_election",
]
