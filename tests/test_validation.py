"""litplug.validation: the shared argument checks, their messages and the values they return.

Which constructor arguments they guard is the bad-input matrix's business (tests/test_bad_inputs.py)."""

import math

import pytest

from litplug.validation import (
    check_bool,
    check_choice,
    check_int,
    check_list,
    check_number,
    check_path,
    check_positive_int,
)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: check_number("x", "0.9"), TypeError, "`x` must be a number, got '0.9' (str)"),
        (lambda: check_number("x", True), TypeError, "`x` must be a number, got True (bool)"),
        (lambda: check_number("x", None), TypeError, "`x` must be a number, got None (NoneType)"),
        (lambda: check_number("x", math.nan, 0, 1), ValueError, "`x` must be a finite number in [0, 1], got nan"),
        (
            lambda: check_number("x", math.inf, low=0, low_open=True),
            ValueError,
            "`x` must be a finite number > 0, got inf",
        ),
        (lambda: check_number("x", -math.inf), ValueError, "`x` must be a finite number, got -inf"),
        (lambda: check_number("x", math.nan, allow_inf=True), ValueError, "`x` must be a number (not NaN), got nan"),
        (lambda: check_number("x", 1.0, 0, 1, high_open=True), ValueError, "`x` must be in [0, 1), got 1.0"),
        (lambda: check_number("x", 0, 0, 1, low_open=True), ValueError, "`x` must be in (0, 1], got 0"),
        (lambda: check_number("x", -1, allow_none=True, low=0), ValueError, "`x` must be >= 0 or None, got -1"),
        (lambda: check_int("n", 2.0, low=1), TypeError, "`n` must be an int >= 1, got 2.0"),
        (lambda: check_int("n", False), TypeError, "`n` must be an int, got False (bool)"),
        (lambda: check_positive_int("n", 0), ValueError, "`n` must be >= 1, got 0"),
        (lambda: check_bool("b", 1), TypeError, "`b` must be True or False, got 1"),
        (lambda: check_bool("b", "true"), TypeError, "`b` must be True or False, got 'true' (str)"),
        (lambda: check_choice("c", "x", ("a", "b")), ValueError, "`c` must be one of 'a', 'b', got 'x' (str)"),
        (lambda: check_choice("c", 1, ("a", "b")), TypeError, "`c` must be one of 'a', 'b', got 1"),
        (lambda: check_list("l", "ab", check_int), TypeError, "`l` must be a list, got 'ab' (str)"),
        (lambda: check_list("l", [1, 0], check_positive_int), ValueError, "`l[1]` must be >= 1, got 0"),
        (lambda: check_list("l", [], check_int, nonempty=True), ValueError, "`l` must be a non-empty list, got []"),
        (lambda: check_path("p", ""), ValueError, "`p` must be a non-empty path (str), got '' (str)"),
        (lambda: check_path("p", 3), TypeError, "`p` must be a non-empty path (str), got 3"),
    ],
)
def test_messages_name_the_argument_the_value_and_what_is_accepted(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


def test_accepted_values_come_back_converted():
    assert check_number("x", 1, 0, 1) == 1.0 and type(check_number("x", 1)) is float
    assert check_number("x", -math.inf, allow_inf=True) == -math.inf
    assert check_number("x", None, allow_none=True) is None
    assert check_list("l", (1, 2), check_positive_int) == [1, 2]
    assert check_choice("c", "a", ("a", "b")) == "a"
