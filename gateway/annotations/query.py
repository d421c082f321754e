"""The cohort query engine: a query (terms, filter, returnFields) checked, expanded and compiled to SQL.

Semantics (PRODUCT.md): the items of a term's `q` are ORed, terms are ANDed, a term or item with a
leading `-` excludes the documents it matches. A CUI is expanded to its narrower concepts, a SNOMED CT
id is mapped to its CUIs and expanded, a mapping name stands for its CUIs as listed, anything else is
free text: a word search over an annotation's preferred name (gateway.annotations.words). Qualifiers
constrain the same annotation that matched, and so does a semantictype (the matched concept is of one of its types or
groups; a CUI's expansion is filtered after it is made). Every value reaches the database as a bound
parameter; a list of any length (CUIs, free texts, modalities) is one parameter, so that a statement's
depth and size do not grow with a query's items (SQLite refuses compounds of 500 SELECTs and expressions
1,000 deep); full-text items are ORed in a balanced tree. A query's cost is bounded before it runs (the
limits below) and while it runs (GATEWAY_SEARCH_SECONDS).
"""
import dataclasses
import functools
import re
import time
from collections import defaultdict
from typing import NamedTuple

import psycopg
from flask import current_app
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema
from sqlalchemy import (
    ARRAY,
    Text,
    any_,
    bindparam,
    except_,
    false,
    func,
    intersect,
    literal,
    literal_column,
    or_,
    select,
    table,
    union,
)
from sqlalchemy.exc import OperationalError

from ..db import db, in_values, values_table
from ..errors import InvalidValue, SearchTooSlow
from ..models import (
    annotation_pref_words,
    annotation_prefs,
    annotations,
    concept_relations,
    concept_snomed,
    concept_types,
    concepts,
    documents,
)
from ..validation import StrictBoolean, StrictInteger, error_lines, storable_text
from . import mappings
from .dictionary import semantic_groups
from .store import CUI_PATTERN, EXPERIENCERS, METADATA_COLUMNS, NEGATIONS, TEMPORALITIES
from .words import parse as parse_free_text

SNOMED_PATTERN = re.compile(r"\d{1,18}")

# The limits of a query, each refused with a 400 that names it.
MAX_TERMS = 100
MAX_ITEMS = 1_000  # values of one list: a term's q, qstop, temporality, modalities, returnFields
MAX_UIDS = 10_000  # values of one UID list of the filter
MAX_TEXT = 1_000  # characters of one value
# q items of all terms together: as many as one term may hold. Each item costs lookups and a share of
# the statement (a parameter of its own in PostgreSQL's full text), so this bounds the work of a query
# to about what one full term costs (100 terms of 1,000 items would cost a hundred times that).
MAX_QUERY_ITEMS = 1_000
# Concepts of all terms together after expansion (each term's CUI list is one parameter of the
# statement): nine times the largest query of the benchmark, a root of 11,111 concepts.
MAX_CONCEPTS = 100_000
_STREAM_BATCH = 2_000
_SQLITE_PROGRESS_STEPS = 1_000  # SQLite VM instructions between looks at the clock
_LIKE_ESCAPE = "\\"
_FULLTEXT_CONFIG = literal_column("'english'")  # a constant, so PostgreSQL matches it to the GIN index


class _TextList(fields.Field):
    """A list of strings, or one string of comma-separated values."""

    def __init__(self, max_items=MAX_ITEMS, split_commas=True, **kwargs):
        super().__init__(**kwargs)
        self.max_items = max_items
        self.split_commas = split_commas

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = value.split(",") if self.split_commas else [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValidationError("must be a string or a list of strings")
        items = [item.strip() for item in value if item.strip()]
        if not items:
            raise ValidationError("must not be empty")
        if len(items) > self.max_items:
            raise ValidationError(f"{len(items):,} values; a list may hold at most {self.max_items:,}")
        for item in items:
            try:
                # NUL or a lone surrogate would fail in the database (or cut a SQLite string short)
                storable_text(item, f"value {item[:20]!r}", MAX_TEXT)
            except ValueError as error:
                raise ValidationError(str(error)) from None
        return items


class _Query(fields.Field):
    """A term's q: a comma-separated string (a leading `-` excludes the whole term) or a list of items."""

    def _deserialize(self, value, attr, data, **kwargs):
        excluded = isinstance(value, str) and value.strip().startswith("-")
        if excluded:
            value = value.strip()[1:]
        items = _TextList()._deserialize(value, attr, data)
        return excluded, items


class _OneOf(fields.String):
    """One of `choices`, matched ignoring case; gives the choice's own spelling."""

    def __init__(self, choices, **kwargs):
        super().__init__(**kwargs)
        self.choices = {choice.lower(): choice for choice in choices}

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if text.lower() not in self.choices:
            raise ValidationError(f"{text!r} is not one of: {', '.join(self.choices.values())}")
        return self.choices[text.lower()]


class _ManyOf(_TextList):
    """One or more of `choices` (a list or a comma string), matched ignoring case."""

    def __init__(self, choices, **kwargs):
        super().__init__(**kwargs)
        self.one = _OneOf(choices)

    def _deserialize(self, value, attr, data, **kwargs):
        return list(dict.fromkeys(self.one._deserialize(item, attr, data) for item in super()._deserialize(value, attr, data)))


# The existing clients' ways of leaving a key unset (PRODUCT.md): the SMI vis page sends every key of its
# form, blank or "Any" when the user chose nothing.


def _blank(value):
    return isinstance(value, str) and not value.strip()


def _blank_or_any(value):
    """"" or "Any" (any case): alone, or among the values of a comma string or a list."""
    if _blank(value):
        return True
    items = value.split(",") if isinstance(value, str) else value
    # a value of another type is left to its field to name
    strings = isinstance(items, list) and all(isinstance(item, str) for item in items)
    return strings and any(item.strip().lower() == "any" for item in items)


def _empty_blank_or_any(value):
    return value == [] or _blank_or_any(value)


class _OrUnset(fields.Field):
    """`field`'s value, or None (the key is left out: no constraint, or the default) for the values that
    `unset` tells."""

    def __init__(self, field, unset=_blank, **kwargs):
        super().__init__(**kwargs)
        self.field, self.unset = field, unset

    def _deserialize(self, value, attr, data, **kwargs):
        return None if self.unset(value) else self.field._deserialize(value, attr, data, **kwargs)


class SemanticTypes(NamedTuple):
    """A term's semantictype: its concepts must have one of these TUIs or be in one of these groups."""

    tuis: frozenset = frozenset()
    groups: frozenset = frozenset()


@functools.cache
def _semantic_type_words():
    """({TUI, semantic type name or semantic group abbreviation, in lower case: its SemanticTypes}, the
    most commas such a word holds), from the shipped semantic groups table."""
    table = semantic_groups()
    words = {}
    for tui, name in table.type_of_tui.items():
        words[tui.lower()] = words[name.lower()] = SemanticTypes(tuis=frozenset({tui}))
    for group in table.group_of_tui.values():
        words[group.lower()] = SemanticTypes(groups=frozenset({group}))
    return words, max(word.count(",") for word in words)


def _named_semantic_types(text):
    """The SemanticTypes of each comma-separated word of `text`; ValidationError naming a word that names
    none. A type name may hold commas itself ("Body Part, Organ, or Organ Component"): the longest run of
    parts that names one is taken."""
    words, most_commas = _semantic_type_words()
    parts, start = text.split(","), 0
    while start < len(parts):
        for end in range(min(len(parts), start + most_commas + 1), start, -1):
            named = words.get(",".join(parts[start:end]).strip().lower())
            if named:
                yield named
                start = end
                break
        else:
            if parts[start].strip():
                raise ValidationError(
                    f"{parts[start].strip()!r} is not a semantic type (a TUI such as T047, or its name) or a"
                    " semantic group (such as DISO)"
                )
            start += 1  # an empty part, as in "T047,"


class _SemanticTypes(_TextList):
    """semantictype: TUIs (T047), semantic type names (Disease or Syndrome, any case) or semantic group
    abbreviations (DISO), ORed; a list of them, or a string of them separated by commas."""

    def __init__(self, **kwargs):
        super().__init__(split_commas=False, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        named = [types for item in super()._deserialize(value, attr, data, **kwargs) for types in _named_semantic_types(item)]
        if not named:
            raise ValidationError("names no semantic type or group")
        return SemanticTypes(frozenset().union(*(types.tuis for types in named)),
                             frozenset().union(*(types.groups for types in named)))


class _LeavesUnsetKeysOut(Schema):
    """A schema of JSON keys, refusing unknown ones, that leaves out the keys whose field gave None."""

    class Meta:
        unknown = RAISE

    @post_load
    def _without_unset_keys(self, data, **kwargs):
        return {key: value for key, value in data.items() if value is not None}


class _TermSchema(_LeavesUnsetKeysOut):
    q = _Query(required=True)
    qdepth = StrictInteger(validate=validate.Range(min=0))
    qstop = _TextList(validate=lambda cuis: all(CUI_PATTERN.fullmatch(cui) for cui in cuis) or _bad_cuis(cuis))
    qonlysty = StrictBoolean()
    negation = _OrUnset(_OneOf(("Any",) + NEGATIONS))
    experiencer = _OrUnset(_OneOf(("Any",) + EXPERIENCERS))
    temporality = _OrUnset(_ManyOf(TEMPORALITIES), unset=_blank_or_any)
    semantictype = _OrUnset(_SemanticTypes(), unset=_blank_or_any)


def _bad_cuis(cuis):
    raise ValidationError(f"not CUIs: {', '.join(cui for cui in cuis if not CUI_PATTERN.fullmatch(cui))}")


class _FilterSchema(_LeavesUnsetKeysOut):
    start_date = _OrUnset(fields.Date(format="%Y-%m-%d"))
    end_date = _OrUnset(fields.Date(format="%Y-%m-%d"))
    modalities = _OrUnset(_TextList(), unset=_empty_blank_or_any)
    sopinstanceuid = _TextList(max_items=MAX_UIDS)
    seriesinstanceuid = _TextList(max_items=MAX_UIDS)
    studyinstanceuid = _TextList(max_items=MAX_UIDS)

    @validates_schema
    def _dates_in_order(self, data, **kwargs):
        if data.get("start_date") and data.get("end_date") and data["start_date"] > data["end_date"]:
            raise ValidationError("start_date is after end_date")


class _QuerySchema(_LeavesUnsetKeysOut):
    terms = fields.List(
        fields.Nested(_TermSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_TERMS, error=f"a query has from 1 to at most {MAX_TERMS} terms"),
    )
    filter = fields.Nested(_FilterSchema)
    returnFields = _OrUnset(_ManyOf(tuple(METADATA_COLUMNS)), unset=lambda value: value == [])

    @validates_schema
    def _items_within_limit(self, data, **kwargs):
        count = sum(len(items) for _excluded, items in (term["q"] for term in data["terms"]))
        if count > MAX_QUERY_ITEMS:
            raise ValidationError(f"{count:,} q items in all; a query may have at most {MAX_QUERY_ITEMS:,}", "terms")


@dataclasses.dataclass
class Term:
    items: list
    excluded: bool = False
    qdepth: int = None
    qstop: frozenset = frozenset()
    qonlysty: bool = True
    negation: str = "Any"
    experiencer: str = "Any"
    temporality: tuple = ()
    semantictype: SemanticTypes = None


@dataclasses.dataclass
class Query:
    terms: list
    filter: dict
    return_fields: list


def parse_query(data):
    """The Query a JSON value describes; InvalidValue with a message naming each bad key or value."""
    if not isinstance(data, dict):
        raise InvalidValue("invalid_query", "the query must be a JSON object with 'terms'")
    try:
        parsed = _QuerySchema().load(data)
    except ValidationError as error:
        raise InvalidValue("invalid_query", "; ".join(error_lines(error.messages))) from None
    terms = []
    for term in parsed["terms"]:
        excluded, items = term.pop("q")
        term["qstop"] = frozenset(cui.upper() for cui in term.get("qstop", ()))
        term["temporality"] = tuple(term.get("temporality", ()))
        terms.append(Term(items=items, excluded=excluded, **term))
    return Query(terms, parsed.get("filter", {}), parsed.get("returnFields", ["SOPInstanceUID"]))


def single_term_query(text):
    """The query of a path's QUERY part alone: one term."""
    return parse_query({"terms": [{"q": text}]})


# --- resolving items ---------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # compared and hashed as itself
class _Matcher:
    """Annotations with one of `cuis`, or with one of `checked_cuis` and one of the preferred names
    `pref_keys` (lower-cased: those that its free texts found), and the term's qualifiers.

    roots: the dictionary's CUIs among what the items name, expanded into `cuis` by _expand.
    """

    term: Term
    roots: set = dataclasses.field(default_factory=set)
    cuis: set = dataclasses.field(default_factory=set)
    pref_keys: set = dataclasses.field(default_factory=set)
    checked_cuis: set = dataclasses.field(default_factory=set)

    def empty(self):
        return not self.cuis and not self.checked_cuis

    def documents(self):
        conditions = [annotations.c.ruled_out == false()]
        if self.term.negation != "Any":
            conditions.append(annotations.c.negation == self.term.negation)
        if self.term.experiencer != "Any":
            conditions.append(annotations.c.experiencer == self.term.experiencer)
        if self.term.temporality:
            conditions.append(annotations.c.temporality.in_(self.term.temporality))
        parts = []
        if self.cuis:  # of the term's semantictype already (_keep_semantic_types)
            parts.append(select(annotations.c.document_id).where(in_values(annotations.c.cui, sorted(self.cuis)), *conditions))
        if self.term.semantictype is not None:  # what free text finds, an annotation at a time
            typed = select(concept_types.c.cui).where(concept_types.c.cui == annotations.c.cui)
            conditions.append(typed.where(_of_semantic_types(self.term.semantictype)).exists())
        if self.checked_cuis:  # found by the concept index, then the name checked on each annotation
            keys = select(values_table(sorted(self.pref_keys)).c.value)
            parts.append(
                select(annotations.c.document_id).where(
                    in_values(annotations.c.cui, sorted(self.checked_cuis)),
                    func.lower(annotations.c.pref).in_(keys),
                    *conditions,
                )
            )
        return _plain(union(*parts)) if len(parts) > 1 else parts[0]


def _matchers(terms):
    """(included, excluded, items) of a query's terms: the matchers of the documents the terms ask for and
    of those they exclude (a term's matcher only if some item is its), and every (matcher, item) in the
    query's order, each item without its `-`."""
    included, excluded, items = [], [], []
    for term in terms:
        wanted, unwanted = _Matcher(term), _Matcher(term)
        term_items = [
            (unwanted if term.excluded or item.startswith("-") else wanted, item.lstrip("-").strip())
            for item in term.items
        ]
        term_items = [(matcher, item) for matcher, item in term_items if item]
        items += term_items
        matched = {matcher for matcher, _item in term_items}
        included += [wanted] if wanted in matched else []
        excluded += [unwanted] if unwanted in matched else []
    return included, excluded, items


def _kind(item):
    if CUI_PATTERN.fullmatch(item):
        return "cui"
    if SNOMED_PATTERN.fullmatch(item):
        return "snomed"
    return "name"  # a mapping's name, else free text


class _Dictionary:
    """What the items of a query stand for: each kind of item looked up for all of them in one statement."""

    def __init__(self, items):
        by_kind = defaultdict(set)
        for item in items:
            by_kind[_kind(item)].add(item)
        cuis = {item.upper() for item in by_kind["cui"]}
        self.known_cuis = set(
            db.session.execute(select(concepts.c.cui).where(in_values(concepts.c.cui, cuis))).scalars() if cuis else ()
        )
        self.snomed_cuis = defaultdict(list)
        if by_kind["snomed"]:
            for snomed_id, cui in db.session.execute(
                select(concept_snomed.c.snomed_id, concept_snomed.c.cui).where(
                    in_values(concept_snomed.c.snomed_id, by_kind["snomed"])
                )
            ):
                self.snomed_cuis[snomed_id].append(cui)
        self.mappings = mappings.get_mappings(by_kind["name"]) if by_kind["name"] else {}
        self.free_texts = _free_text_matches({name for name, mapping in self.mappings.items() if mapping is None})

    def resolve(self, items):
        """Puts each (matcher, item) into its matcher: roots, CUIs or free texts; the warnings, in item order."""
        warnings = []
        for matcher, item in items:
            kind = _kind(item)
            if kind == "cui":
                cui = item.upper()
                if cui in self.known_cuis:
                    matcher.roots.add(cui)
                else:
                    warnings.append(f"{cui} is not in the concept dictionary: it matches only itself")
                    matcher.cuis.add(cui)
            elif kind == "snomed":
                if item not in self.snomed_cuis:
                    warnings.append(f"SNOMED CT id {item} is not in the concept dictionary")
                matcher.roots.update(self.snomed_cuis.get(item, ()))
            elif (mapping := self.mappings.get(item)) is not None:
                matcher.cuis.update(cui for cuis in mapping.values() for cui in cuis)
            else:
                matched = self.free_texts[item]
                if matched is None:
                    warnings.append(f"free text {item!r} has no word to search for (stop words are not searched)")
                matcher.pref_keys |= matched or set()
        _add_named_cuis({matcher for matcher, _item in items if matcher.pref_keys})
        return warnings


def _add_named_cuis(matchers):
    """Adds to each matcher the CUIs annotated under the preferred names that its free texts found
    (annotation_prefs, one statement for all): to `cuis` a CUI whose every name they found, so that the
    concept index answers alone, to `checked_cuis` one annotated under other names too."""
    if not matchers:
        return
    keys = set().union(*(matcher.pref_keys for matcher in matchers))
    found = select(annotation_prefs.c.cui).where(in_values(annotation_prefs.c.pref_key, keys))
    names_of, cuis_of = defaultdict(set), defaultdict(set)
    for cui, key in db.session.execute(
        select(annotation_prefs.c.cui, annotation_prefs.c.pref_key).where(annotation_prefs.c.cui.in_(found))
    ):
        names_of[cui].add(key)
        cuis_of[key].add(cui)
    for matcher in matchers:
        for cui in set().union(*(cuis_of[key] for key in matcher.pref_keys)):
            (matcher.cuis if names_of[cui] <= matcher.pref_keys else matcher.checked_cuis).add(cui)


def _free_text_matches(items):
    """{item: the keys of the preferred names that the free text matches, None if it has no word}: the
    words of all items looked up in one statement, then matched here, within the time budget."""
    seconds = current_app.config["SEARCH_SECONDS"]
    deadline = time.monotonic() + seconds
    try:
        parsed = {item: parse_free_text(item) for item in items}
    except ValueError as error:
        raise InvalidValue("invalid_query", str(error)) from None
    stems = set().union(*(free_text.stems() for free_text in parsed.values()))
    postings = defaultdict(lambda: defaultdict(set))  # {stem: {pref_key: {positions}}}
    if stems:
        index = annotation_pref_words.c
        for stem, key, position in db.session.execute(
            select(index.stem, index.pref_key, index.position).where(in_values(index.stem, stems))
        ):
            postings[stem][key].add(position)
    matches = {}
    for item, free_text in parsed.items():
        if time.monotonic() > deadline:
            raise _too_slow(seconds)
        matches[item] = free_text.pref_keys(postings) if free_text.groups else None
    return matches


# --- concept expansion ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Walk:
    """A breadth-first walk from roots of one semantic group set down the dictionary into a matcher's CUIs.

    Each concept is reached once (cycles end there); the term's qstop concepts are left out with whatever
    is reached only through them; with qonlysty, so are concepts that share none of `groups` (the roots'
    semantic groups; none: any concept is kept).
    """

    matcher: _Matcher
    groups: frozenset
    frontier: set
    found: set = dataclasses.field(init=False)

    def __post_init__(self):
        self.found = set(self.frontier)
        self.matcher.cuis |= self.frontier

    def goes_on(self, level):
        depth = self.matcher.term.qdepth
        return bool(self.frontier) and (depth is None or level < depth)

    def step(self, children):
        """One level down; children: {parent: {child: its semantic groups}}."""
        stop = self.matcher.term.qstop
        self.frontier = {
            child
            for parent in self.frontier
            for child, groups in children.get(parent, {}).items()
            if child not in self.found and child not in stop and (not self.groups or groups & self.groups)
        }
        self.found |= self.frontier
        self.matcher.cuis |= self.frontier


def _semantic_groups(cuis):
    rows = db.session.execute(
        select(concept_types.c.cui, concept_types.c.semantic_group).where(in_values(concept_types.c.cui, cuis))
    )
    groups = defaultdict(set)
    for cui, group in rows:
        groups[cui].add(group)
    return groups


def _children(parents):
    """{parent: {child: its semantic groups}} of the narrower relations of `parents`."""
    rows = db.session.execute(
        select(concept_relations.c.parent_cui, concept_relations.c.child_cui, concept_types.c.semantic_group)
        .select_from(concept_relations.outerjoin(concept_types, concept_types.c.cui == concept_relations.c.child_cui))
        .where(in_values(concept_relations.c.parent_cui, parents))
    )
    children = defaultdict(lambda: defaultdict(set))
    for parent, child, group in rows:
        children[parent][child].add(group)
    return children


def _expand(matchers):
    """Adds to each matcher's CUIs its roots with their narrower concepts (see _Walk).

    The roots of a matcher that share their semantic groups walk together, and every walk of the query
    goes down a level at a time: one statement per level, however many roots. InvalidValue as soon as the
    matchers' CUIs (counted per matcher) are more than MAX_CONCEPTS.
    """
    with_groups = {root for matcher in matchers if matcher.term.qonlysty for root in matcher.roots}
    groups_of = _semantic_groups(with_groups) if with_groups else {}
    walks = []
    for matcher in matchers:
        frontiers = defaultdict(set)
        for root in matcher.roots - matcher.term.qstop:
            frontiers[frozenset(groups_of.get(root, ())) if matcher.term.qonlysty else frozenset()].add(root)
        walks += [_Walk(matcher, groups, frontier) for groups, frontier in frontiers.items()]
    level = 0
    while True:
        count = sum(len(matcher.cuis) for matcher in matchers)
        if count > MAX_CONCEPTS:
            raise InvalidValue(
                "invalid_query",
                f"the query's items stand for more than {MAX_CONCEPTS:,} concepts after expansion, the most a"
                " query may have; narrow it with qdepth or qstop, or split it",
            )
        walks = [walk for walk in walks if walk.goes_on(level)]
        if not walks:
            return
        children = _children(set().union(*(walk.frontier for walk in walks)))
        for walk in walks:
            walk.step(children)
        level += 1


def _of_semantic_types(types):
    """The concept_types rows of one of the TUIs or groups of a term's semantictype."""
    conditions = [concept_types.c.tui.in_(sorted(types.tuis))] if types.tuis else []
    conditions += [concept_types.c.semantic_group.in_(sorted(types.groups))] if types.groups else []
    return or_(*conditions)


def _keep_semantic_types(matchers):
    """Leaves in the CUIs of each matcher whose term has a semantictype only those of its types or groups
    (after expansion, so that a concept of one group finds its narrower concepts of another with qonlysty
    false); a CUI that the dictionary gives no type is left out. One statement per semantictype."""
    by_types = defaultdict(list)
    for matcher in matchers:
        if matcher.term.semantictype is not None:
            by_types[matcher.term.semantictype].append(matcher)
    for types, typed in by_types.items():
        cuis = set().union(*(matcher.cuis for matcher in typed))
        kept = set(
            db.session.execute(
                select(concept_types.c.cui).where(in_values(concept_types.c.cui, cuis), _of_semantic_types(types))
            ).scalars()
        ) if cuis else set()
        for matcher in typed:
            matcher.cuis &= kept


# --- compiling a query ------------------------------------------------------------------------------


def _like_escaped(text):
    """text as a LIKE pattern that matches only itself, with _LIKE_ESCAPE as its ESCAPE character."""
    return text.replace(_LIKE_ESCAPE, 2 * _LIKE_ESCAPE).replace("%", _LIKE_ESCAPE + "%").replace("_", _LIKE_ESCAPE + "_")


def _plain(compound):
    """A compound SELECT as a plain SELECT of its rows: SQLite refuses a compound nested in another."""
    return select(compound.subquery().c[0])


def _combine(included, excluded):
    """SELECT of the ids of documents in every one of the `included` SELECTs and in none of `excluded`."""
    matched = _plain(intersect(*included)) if len(included) > 1 else included[0]
    if excluded:
        matched = except_(matched, _plain(union(*excluded)) if len(excluded) > 1 else excluded[0])
    return matched


def _has_a_modality(modalities):
    """ModalitiesInStudy holds one of `modalities`. It is DICOM multi-valued ("CT\\SR"): look for \\CT\\ in
    \\CT\\SR\\, with LIKE patterns from one list parameter, escaped by a backslash (PostgreSQL's default
    ESCAPE character, which `LIKE ANY` cannot change; SQLite is told)."""
    delimited = literal("\\") + documents.c.modalities_in_study + literal("\\")
    patterns = ["%" + _like_escaped("\\" + modality.upper() + "\\") + "%" for modality in modalities]
    if db.engine.dialect.name == "postgresql":
        return delimited.like(any_(bindparam(None, patterns, type_=ARRAY(Text))))
    # MATERIALIZED: read once, not again for each document
    listed = select(values_table(patterns).c.value.label("pattern")).cte("modality_patterns").prefix_with("MATERIALIZED")
    return select(listed.c.pattern).where(delimited.like(listed.c.pattern, escape=_LIKE_ESCAPE)).exists()


def _filters(query_filter):
    conditions = []
    if "start_date" in query_filter:
        conditions.append(documents.c.content_date >= query_filter["start_date"])
    if "end_date" in query_filter:
        conditions.append(documents.c.content_date <= query_filter["end_date"])
    if "modalities" in query_filter:
        conditions.append(_has_a_modality(query_filter["modalities"]))
    for key, column in (
        ("sopinstanceuid", documents.c.sop_instance_uid),
        ("seriesinstanceuid", documents.c.series_instance_uid),
        ("studyinstanceuid", documents.c.study_instance_uid),
    ):
        if key in query_filter:
            conditions.append(in_values(column, query_filter[key]))
    return conditions


@dataclasses.dataclass
class Search:
    """A compiled search: run rows() to stream the results (None statement: nothing can match)."""

    statement: object
    return_fields: list
    warnings: list

    def rows(self):
        """The results, distinct and in a stable order: strings for one field, else dicts by field name."""
        if self.statement is None:
            return
        dates = [index for index, field in enumerate(self.return_fields) if field == "ContentDate"]
        single = len(self.return_fields) == 1
        for row in _stream(self.statement):
            if dates:
                row = list(row)
                for index in dates:
                    row[index] = row[index] and row[index].strftime("%Y%m%d")  # DICOM format, as the spec says
            yield row[0] if single else dict(zip(self.return_fields, row))

    def all(self):
        return list(self.rows())


def _too_slow(seconds):
    return SearchTooSlow(
        "search_too_slow",
        f"the search took longer than {seconds:g} s, the most a search may take; narrow it (fewer items or"
        " concepts, a date range, fewer documents) or try again later",
    )


def _stream(statement):
    """Rows of a statement fetched in batches (a server-side cursor on PostgreSQL); SearchTooSlow when the
    database works on one batch for longer than the time budget (GATEWAY_SEARCH_SECONDS)."""
    # per batch of rows: the time a client takes to read the answer does not count
    seconds = current_app.config["SEARCH_SECONDS"]
    if db.engine.dialect.name == "postgresql":
        # A server-side cursor lives in a transaction; the app's connections run in autocommit.
        with db.engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
            # For this transaction only (SET LOCAL); each FETCH of the cursor is a statement of its own.
            milliseconds = max(1, round(seconds * 1000))  # 0 would mean no limit
            connection.execute(select(func.set_config("statement_timeout", str(milliseconds), True)))
            try:
                yield from connection.execution_options(yield_per=_STREAM_BATCH).execute(statement)
            except OperationalError as error:
                if isinstance(error.orig, psycopg.errors.QueryCanceled):
                    raise _too_slow(seconds) from None
                raise
            connection.rollback()
        return
    # SQLite: a progress handler, called as the statement runs, interrupts it once the budget of the
    # batch being fetched is spent; the clock starts again for each batch. The stream has a connection
    # of its own, as on PostgreSQL: the request's session is closed when the view returns, before the
    # answer is sent, and its connection may then serve another request's thread.
    with db.engine.connect() as connection:
        sqlite_connection = connection.connection.driver_connection
        deadline = time.monotonic() + seconds

        def spent():
            return time.monotonic() > deadline

        sqlite_connection.set_progress_handler(spent, _SQLITE_PROGRESS_STEPS)
        try:
            for batch in connection.execution_options(yield_per=_STREAM_BATCH).execute(statement).partitions():
                yield from batch
                deadline = time.monotonic() + seconds
        except OperationalError:
            if spent():
                raise _too_slow(seconds) from None
            raise
        finally:  # the connection goes back to the pool: no handler may stay on it
            sqlite_connection.set_progress_handler(None, 0)


def _final_statement(matched_ids, query):
    columns = [METADATA_COLUMNS[field] for field in query.return_fields]
    matched = select(matched_ids.subquery().c[0])
    if db.engine.dialect.name == "postgresql":
        # As an array, the matched ids are looked up by primary key. PostgreSQL guesses the size of
        # `id IN (subquery)` from the CUI list and, guessing high, would scan all documents instead.
        is_matched = documents.c.id == any_(func.array(matched.scalar_subquery()))
        # UIDs and codes sort byte by byte (as on SQLite), not by the locale's slower rules
        columns = [column if column is documents.c.content_date else column.collate("C") for column in columns]
    else:
        is_matched = documents.c.id.in_(matched)
    statement = select(*columns).where(is_matched, *_filters(query.filter))
    if query.return_fields == ["SOPInstanceUID"]:
        # Unique already, and in id order as the lookups read them: nothing to sort.
        return statement.order_by(documents.c.id)
    return statement.distinct().order_by(*(column.asc().nulls_last() for column in columns))


def search_annotations(query):
    """The Search of documents whose annotations match the query."""
    included, excluded, items = _matchers(query.terms)
    if not included:
        raise InvalidValue("invalid_query", "a query made only of exclusions would return every document")
    warnings = _Dictionary(item for _matcher, item in items).resolve(items)
    _expand(included + excluded)
    _keep_semantic_types(included + excluded)
    if any(matcher.empty() for matcher in included):
        return Search(None, query.return_fields, warnings)
    excluded = [matcher for matcher in excluded if not matcher.empty()]
    matched = _combine([matcher.documents() for matcher in included], [matcher.documents() for matcher in excluded])
    return Search(_final_statement(matched, query), query.return_fields, warnings)


# --- full text --------------------------------------------------------------------------------------

_fts_table = table("documents_fts", literal_column("rowid"))
_WORD = re.compile(r"[^\W_]+")  # as FTS5's unicode61 tokenizer splits words: "_" is a separator


def _ored(tsqueries):
    """The tsqueries ORed in a balanced tree of `||`: a chain would be as deep as they are many, too deep
    for SQLAlchemy's compiler at 1,000 (joined as text and cast back to one tsquery, they would take
    PostgreSQL's parser seconds). One parameter each: MAX_QUERY_ITEMS keeps them few."""
    if len(tsqueries) == 1:
        return tsqueries[0]
    middle = len(tsqueries) // 2
    return _ored(tsqueries[:middle]).op("||")(_ored(tsqueries[middle:]))


def _fulltext_ids(items):
    """SELECT of the ids of documents whose text has every word of one of the items."""
    phrases = [_WORD.findall(item) for item in items]
    if not all(phrases):
        raise InvalidValue("invalid_query", "a full-text item without any word to search for")
    if db.engine.dialect.name == "postgresql":
        tsquery = _ored([func.plainto_tsquery(_FULLTEXT_CONFIG, item) for item in items])
        vector = func.to_tsvector(_FULLTEXT_CONFIG, func.coalesce(documents.c.report_text, literal_column("''")))
        return select(documents.c.id).where(vector.op("@@")(tsquery))
    # FTS5 query syntax from words only: each word quoted, words ANDed, items ORed.
    match = " OR ".join("(" + " ".join(f'"{word}"' for word in words) + ")" for words in phrases)
    return select(literal_column("rowid")).select_from(_fts_table).where(literal_column("documents_fts").op("MATCH")(match))


def search_documents(query):
    """The Search of documents whose report text matches: each term's items ORed, terms ANDed, `-` excludes."""
    included, excluded = [], []
    for term in query.terms:
        wanted = [item for item in term.items if not (term.excluded or item.startswith("-"))]
        unwanted = [item.lstrip("-") for item in term.items if term.excluded or item.startswith("-")]
        if wanted:
            included.append(_fulltext_ids(wanted))
        if unwanted:
            excluded.append(_fulltext_ids(unwanted))
    if not included:
        raise InvalidValue("invalid_query", "a query made only of exclusions would return every document")
    return Search(_final_statement(_combine(included, excluded), query), query.return_fields, [])
