"""Checking one number a user typed against its declared limit (:mod:`..limits`).

Kept apart from :mod:`.settings` so that :mod:`.seeds` (which settings uses) can check seeds the same way.
Messages name the setting, the range and the value, because in ComfyUI the message is all the user sees.
"""

from __future__ import annotations

import math
from numbers import Real

from .. import limits
from ..errors import InputError


def show(number) -> str:
    """A bound as people write it: 18446744073709551615, not 1.84467e+19; 7.5, not 7.500000."""
    if isinstance(number, int) and not isinstance(number, bool):
        return str(number)
    return f"{number:g}"


def check_int(value, name: str, bounds: limits.Range, hint: str = "") -> int:
    """A whole number within ``bounds``; integral floats (20.0, as some nodes send) are taken as ints."""
    if isinstance(value, bool) or not isinstance(value, Real) or (
        not isinstance(value, int) and (not math.isfinite(value) or value != int(value))
    ):
        raise InputError(f"{name} must be a whole number, got {value!r}{hint}")
    value = int(value)
    if value not in bounds:
        raise InputError(f"{name} must be between {show(bounds.low)} and {show(bounds.high)}, got {value}{hint}")
    return value


def check_float(value, name: str, bounds: limits.Range, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value not in bounds:
        raise InputError(
            f"{name} must be a number between {show(bounds.low)} and {show(bounds.high)}, got {value!r}{hint}"
        )
    return float(value)
