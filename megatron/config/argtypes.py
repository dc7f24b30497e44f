"""argparse `type=` converters shared by every concern's flags (written once, imported by each add_*_arguments)."""

from __future__ import annotations

import argparse


def positive(kind):
    """`type=positive(int)` / `positive(float)`: the value must be > 0. Keeps `kind`'s name, so argparse says
    "invalid int value" for text that is not a number."""
    def convert(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


non_negative_int.__name__ = "int"  # argparse: "invalid int value: 'x'"

pos_int = positive(int)
pos_float = positive(float)
