"""Counts in console messages: "1 image", "2 images", "1.5 epochs"."""

from __future__ import annotations


def counted(count: float, noun: str, plural: str | None = None, spec: str = "") -> str:
    """`count` and `noun` as a message says them: the noun singular where the count reads as one ("1 image",
    "1 epoch"), else plural (`plural`, or `noun` with an s). `spec` formats the count ("1.5" with ".3g")."""
    shown = format(count, spec)
    return f"{shown} {noun if shown == '1' else plural or noun + 's'}"
