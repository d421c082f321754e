"""The words of a preferred name, and free-text queries over them, as PostgreSQL's `english` text search has them.

Free text in an annotation query is a word search over each annotation's preferred name with the meaning of
`websearch_to_tsquery('english', q) @@ to_tsvector('english', pref)` (PRODUCT.md). It is computed here, in
Python, for both stores alike: the importer indexes words() of each preferred name (annotation_pref_words)
and the query engine matches a FreeText against that index.

words() splits text as PostgreSQL's default parser does for the words, numbers and hyphenated words that
names are made of, lower-cases them, drops the English stop words (PostgreSQL's english.stop, shipped here)
but counts their positions, and stems the rest with Snowball's English stemmer, as the english_stem
dictionary does; tokens with digits are kept as they are (the `simple` dictionary). A hyphenated word is
itself a word, followed by its parts ("x-ray": x-ray, x, ray). Where PostgreSQL's parser sees something
else (an e-mail or web address, a host or file name such as "s/p", a version such as "v1.2") this module
sees separate words.
"""
import dataclasses
import functools
import re
from pathlib import Path

import snowballstemmer

STOP_WORDS = frozenset(Path(__file__).with_name("english.stop").read_text().split())

_LETTER_PART = r"[^\W\d_][^\W_]*"  # starts with a letter; letters and digits
_TOKEN = re.compile(
    rf"(?P<hyphenated>{_LETTER_PART}(?:-{_LETTER_PART})+)"
    r"|(?P<number>-?\d+(?:\.\d+)+|-\d+(?![^\W_]))"  # a decimal or version, or a signed integer
    r"|(?P<word>[^\W_]+)"
)
_stemmer = snowballstemmer.stemmer("english")


@functools.lru_cache(maxsize=100_000)  # names repeat their words; stemming is the costly part
def _lexeme(token):
    """The token's index entry: None for a stop word."""
    token = token.lower()
    if any(character.isdigit() for character in token):
        return token
    return None if token in STOP_WORDS else _stemmer.stemWord(token)


def words(text):
    """[(position, stem)] of the words of `text`, positions counted from 1, stop words counting."""
    found, position = [], 0
    for match in _TOKEN.finditer(text):
        tokens = [match.group()] + (match.group().split("-") if match.lastgroup == "hyphenated" else [])
        for token in tokens:
            position += 1
            lexeme = _lexeme(token)
            if lexeme is not None:
                found.append((position, lexeme))
    return found


# --- free-text queries ------------------------------------------------------------------------------

# A quoted phrase (to the next quote, or the end), or a run of characters that websearch_to_tsquery
# reads as one operand (its operator characters and white space separate operands).
_OPERAND = re.compile(r'"(?P<quoted>[^"]*)"?|(?P<plain>[^\s"&|!()<:]+)')


@dataclasses.dataclass(frozen=True)
class Phrase:
    """Words that must occur at these positions relative to each other (one word: anywhere)."""

    words: tuple  # ((position, stem), …), in order
    excluded: bool = False

    def pref_keys(self, postings):
        """The preferred names (keys) that hold the phrase; postings: {stem: {pref_key: {positions}}}."""
        (first_position, first_stem), *rest = self.words
        starts = postings.get(first_stem, {})
        if not rest:
            return set(starts)
        keys = set(starts).intersection(*(postings.get(stem, {}) for _position, stem in rest))
        return {
            key
            for key in keys
            if any(
                all(start - first_position + position in postings[stem][key] for position, stem in rest)
                for start in starts[key]
            )
        }


@dataclasses.dataclass(frozen=True)
class FreeText:
    """A websearch_to_tsquery query: an OR of groups, each group phrases that must all hold (or, those
    excluded, not hold) in the same preferred name. No groups: the text has no word to search for."""

    groups: tuple  # ((Phrase, …), …)

    def stems(self):
        return {stem for group in self.groups for phrase in group for _position, stem in phrase.words}

    def pref_keys(self, postings):
        """The keys of the preferred names that match; postings: {stem: {pref_key: {positions}}}, at
        least for stems()."""
        matched = set()
        for group in self.groups:
            wanted = sorted((phrase.pref_keys(postings) for phrase in group if not phrase.excluded), key=len)
            keys = wanted[0].intersection(*wanted[1:])
            for phrase in group:
                if phrase.excluded and keys:
                    keys -= phrase.pref_keys(postings)
            matched |= keys
        return matched


def parse(text):
    """The FreeText of websearch syntax: words ANDed, "quoted phrases", `or` between them, `-` before a word
    or phrase to exclude it. Words are what words() finds: a phrase of stop words only drops out (as
    PostgreSQL drops it). ValueError if a group would hold exclusions only: it would match almost every
    name."""
    groups, group, excluding = [], [], False
    for match in _OPERAND.finditer(text):
        operand = match.group("quoted")
        if operand is None:
            operand = match.group("plain")
            if operand.startswith("-"):
                excluding, operand = True, operand.lstrip("-")
            if not operand:
                continue  # the `-` applies to the next operand
            if operand.lower() == "or" and not excluding:
                groups.append(group)
                group = []
                continue
        found = words(operand)
        if found:
            group.append(Phrase(tuple(found), excluding))
        excluding = False
    groups.append(group)
    groups = [tuple(group) for group in groups if group]
    for group in groups:
        if all(phrase.excluded for phrase in group):
            raise ValueError(
                f"free text {text!r}: a part of it (between `or`s) has only excluded words and would match"
                " almost every preferred name; add a word to find"
            )
    return FreeText(tuple(groups))
