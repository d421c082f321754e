"""A concept's names as the report annotator matches them: light, so that what reads or writes names (the
dictionary's loader, the report worker) need not import spaCy."""
from typing import NamedTuple


class Term(NamedTuple):
    """One name of a concept."""

    cui: str
    name: str  # a preferred name or a synonym
    pref: str  # the concept's preferred name
    sty: str | None  # its semantic type name, None if unknown


def name_key(name):
    """What a name is matched by: lower case, runs of whitespace as one space (names that differ only there
    are one name)."""
    return " ".join(name.lower().split())
