"""UserError, the exception for mistakes a user can fix (bad names, files, flags, config
values), and the checks that raise it for one value, naming its key:

    require_fields(self, batch_size=POSITIVE_INT)   # in a config's __post_init__
    -> UserError("TrainConfig.batch_size=-3: expected a positive integer")
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any


class UserError(ValueError):
    """A configuration or input error; the CLI prints its message without a traceback."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A test of one value, and what a failing value is told it should be."""

    expected: str
    test: Callable[[Any], bool]


# numbers.*: NumPy's scalars pass too; bool does not, though Python counts True as an integer.
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


POSITIVE_INT = Check("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Check("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBER = Check("a positive number", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Check("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Check("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
BOOL = Check("True or False", lambda v: isinstance(v, bool))
NAME = Check("a non-empty string", lambda v: isinstance(v, str) and bool(v))
PATH = Check("a path", lambda v: isinstance(v, (str, os.PathLike)) and bool(os.fspath(v)))
FEATURE_LENGTHS = Check(
    "a dict of positive integers for 'inputs' and 'targets', e.g. {'inputs': 512, 'targets': 128}",
    lambda v: isinstance(v, Mapping) and set(v) == {"inputs", "targets"} and all(map(POSITIVE_INT.test, v.values())),
)


def one_of(*choices: Any) -> Check:
    return Check(f"one of {', '.join(map(repr, choices))}", lambda v: any(v == c and type(v) is type(c) for c in choices))


def optional(check: Check) -> Check:
    return Check(f"{check.expected}, or None", lambda v: v is None or check.test(v))


def require(key: str, value: Any, check: Check) -> None:
    """Raises UserError("KEY=VALUE: expected ...") unless `value` passes `check`."""
    if not check.test(value):
        raise UserError(f"{key}={value!r}: expected {check.expected}")


def require_fields(config: Any, **checks: Check) -> None:
    """Checks a config's fields by name; a failure names `ClassName.field`, as a gin binding does."""
    for name, check in checks.items():
        require(f"{type(config).__name__}.{name}", getattr(config, name), check)
