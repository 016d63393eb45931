"""argparse value types shared by ``llmesh`` and ``llmesh bench``.

Each turns an option's text into a number or raises ``argparse.ArgumentTypeError``, which
argparse reports as a usage error (exit code 2) naming the option.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """A whole number of at least 1.

    Args:
        text: the option's value as given.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0.

    Args:
        text: the option's value as given.
    """
    if text.strip() == "0":
        return 0
    return positive_int(text)


def non_negative_float(text: str) -> float:
    """A number of at least 0.

    Args:
        text: the option's value as given.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number greater than 0.

    Args:
        text: the option's value as given.
    """
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds greater than 0 (no nan, no inf).

    Args:
        text: the option's value as given.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
