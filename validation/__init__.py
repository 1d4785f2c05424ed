"""The normalized return (`remontee.return/1`), normalization of each channel's input, and the checks.

Pure code: no I/O. Checks return findings and never raise for an expected problem.
"""

from validation.checks import (
    Finding,
    Reason,
    check_arithmetic,
    check_history,
    check_registry,
    check_return,
    decide,
    suggest_single_digit_fixes,
)
from validation.normalize import normalize_bureau_code, parse_count
from validation.returns import SCHEMA, Return, ReturnSchemaError, new_return, new_return_id, utc_now

__all__ = [
    "SCHEMA",
    "Finding",
    "Reason",
    "Return",
    "ReturnSchemaError",
    "check_arithmetic",
    "check_history",
    "check_registry",
    "check_return",
    "decide",
    "new_return",
    "new_return_id",
    "normalize_bureau_code",
    "parse_count",
    "suggest_single_digit_fixes",
    "utc_now",
]
