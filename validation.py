"""Argument checks shared by every public constructor of litplug.

Each helper checks one argument and returns it (converted to ``float``/``int``/``list`` where that
is lossless), raising

* ``TypeError`` when the value has the wrong type: a string ``"0.9"`` where a number is expected,
  a ``bool`` where a number is expected (``True`` is an ``int`` in Python, never a meaningful rate),
  a float where an int is expected;
* ``ValueError`` when the type is right but the value is not accepted: NaN, +-inf, outside the
  range, not one of the choices.

Every message names the argument, the value and what is accepted, e.g.
``ValueError: `decay` must be a finite number in (0, 1), got nan`` or
``TypeError: `decay` must be a number in (0, 1), got '0.9' (str)``.

Example:
    >>> from litplug.validation import check_number
    >>> check_number("decay", 0.9, low=0, high=1, low_open=True, high_open=True)
    0.9
    >>> check_number("decay", "0.9", low=0, high=1)
    Traceback (most recent call last):
    ...
    TypeError: `decay` must be a number in [0, 1], got '0.9' (str)
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_list",
    "check_number",
    "check_path",
    "check_positive_int",
    "check_str",
    "describe_range",
]


def _got(value: Any) -> str:
    if isinstance(value, (str, bytes, bool)) or value is None:
        return f"{value!r} ({type(value).__name__})"
    return repr(value)


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``"in (0, 1]"``, ``"> 0"``, ``">= 1"``, ``"<= 5"`` or ``""`` (no bound).

    Example:
        >>> describe_range(0, 1, low_open=True), describe_range(1, None), describe_range(None, None)
        ('in (0, 1]', '>= 1', '')
    """
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {fmt(high)}"
    return ""


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> Any:
    """A finite real number (an int is accepted as a float) within ``[low, high]``; the ends
    are excluded with ``low_open``/``high_open``; ``allow_inf`` also accepts +-inf (never NaN).
    Returns ``float(value)`` (or ``None``)."""
    if value is None and allow_none:
        return None
    bounds = describe_range(low, high, low_open, high_open)
    none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number{' ' + bounds if bounds else ''}{none}, got {_got(value)}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        kind = "a number (not NaN)" if allow_inf else "a finite number"
        raise ValueError(f"`{name}` must be {kind}{' ' + bounds if bounds else ''}{none}, got {_got(value)}")
    if not _in_range(value, low, high, low_open, high_open):
        raise ValueError(f"`{name}` must be {bounds}{none}, got {_got(value)}")
    return float(value)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, allow_none: bool = False) -> Any:
    """An int (not a bool, not a float) within ``[low, high]``. Returns ``int(value)`` (or ``None``)."""
    if value is None and allow_none:
        return None
    bounds = describe_range(low, high)
    none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int{' ' + bounds if bounds else ''}{none}, got {_got(value)}")
    if not _in_range(value, low, high, False, False):
        raise ValueError(f"`{name}` must be {bounds}{none}, got {_got(value)}")
    return int(value)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> Any:
    """An int >= 1."""
    return check_int(name, value, low=1, allow_none=allow_none)


def check_fraction(name: str, value: Any, low_open: bool = False, high_open: bool = True) -> float:
    """A finite number in ``[0, 1)`` (ends open or closed as asked)."""
    return check_number(name, value, 0.0, 1.0, low_open=low_open, high_open=high_open)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not ``0``/``1``, not ``"true"``)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {_got(value)}")
    return value


def check_str(name: str, value: Any, allow_none: bool = False, nonempty: bool = True) -> Any:
    """A string (non-empty unless ``nonempty=False``), e.g. a path."""
    if value is None and allow_none:
        return None
    what = ("a non-empty string" if nonempty else "a string") + (" or None" if allow_none else "")
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be {what}, got {_got(value)}")
    if nonempty and not value:
        raise ValueError(f"`{name}` must be {what}, got {_got(value)}")
    return value


def check_path(name: str, value: Any, allow_none: bool = False) -> Any:
    """A non-empty file or folder path: a ``str`` or an ``os.PathLike``."""
    if value is None and allow_none:
        return None
    what = "a non-empty path (str)" + (" or None" if allow_none else "")
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be {what}, got {_got(value)}")
    if not os.fspath(value):
        raise ValueError(f"`{name}` must be {what}, got {_got(value)}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any], allow_none: bool = False) -> Any:
    """One of ``choices`` (compared with ``==`` after a type check against the choices' types)."""
    if value is None and allow_none:
        return None
    what = f"one of {', '.join(repr(c) for c in choices)}" + (" or None" if allow_none else "")
    types = tuple({type(c) for c in choices})
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise TypeError(f"`{name}` must be {what}, got {_got(value)}")
    if value not in choices:
        raise ValueError(f"`{name}` must be {what}, got {_got(value)}")
    return value


def check_list(name: str, value: Any, item: Callable[[str, Any], T], nonempty: bool = False) -> list[T]:
    """A list or tuple whose every element passes ``item(name_i, element)``, e.g.
    ``check_list("hidden", hidden, check_positive_int)``; a string is not a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a list, got {_got(value)}")
    if nonempty and not value:
        raise ValueError(f"`{name}` must be a non-empty list, got {list(value)!r}")
    return [item(f"{name}[{i}]", v) for i, v in enumerate(value)]
