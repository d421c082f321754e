"""The cohort query engine: a query (terms, filter, returnFields) checked, expanded and compiled to SQL.

Semantics (PRODUCT.md): the items of a term's `q` are ORed, terms are ANDed, a term or item with a
leading `-` excludes the documents it matches. A CUI is expanded to its narrower concepts, a SNOMED CT
id is mapped to its CUIs and expanded, a mapping name stands for its CUIs as listed, anything else is
free text matched against an annotation's preferred name, ignoring case. Qualifiers constrain the
same annotation that matched. Every value reaches the database as a bound parameter; a CUI list of
any length is one parameter (db.in_values).
"""
import dataclasses
import re
from collections import defaultdict

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import (
    any_,
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

from ..db import db, in_values
from ..errors import InvalidValue
from ..models import annotation_prefs, annotations, concept_relations, concept_snomed, concept_types, concepts, documents
from ..validation import StrictBoolean, error_lines
from . import mappings
from .store import CUI_PATTERN, EXPERIENCERS, METADATA_COLUMNS, NEGATIONS, TEMPORALITIES

SNOMED_PATTERN = re.compile(r"\d{1,18}")
MAX_ITEMS = 1_000
MAX_UIDS = 10_000
MAX_TEXT = 1_000
_STREAM_BATCH = 2_000
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
            raise ValidationError(f"more than {self.max_items} values")
        if any(len(item) > MAX_TEXT for item in items):
            raise ValidationError(f"a value is longer than {MAX_TEXT} characters")
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


class _TermSchema(Schema):
    class Meta:
        unknown = RAISE

    q = _Query(required=True)
    qdepth = fields.Integer(strict=True, validate=validate.Range(min=0))
    qstop = _TextList(validate=lambda cuis: all(CUI_PATTERN.fullmatch(cui) for cui in cuis) or _bad_cuis(cuis))
    qonlysty = StrictBoolean()
    negation = _OneOf(("Any",) + NEGATIONS)
    experiencer = _OneOf(("Any",) + EXPERIENCERS)
    temporality = _ManyOf(TEMPORALITIES)


def _bad_cuis(cuis):
    raise ValidationError(f"not CUIs: {', '.join(cui for cui in cuis if not CUI_PATTERN.fullmatch(cui))}")


class _FilterSchema(Schema):
    class Meta:
        unknown = RAISE

    start_date = fields.Date(format="%Y-%m-%d")
    end_date = fields.Date(format="%Y-%m-%d")
    modalities = _TextList()
    sopinstanceuid = _TextList(max_items=MAX_UIDS)
    seriesinstanceuid = _TextList(max_items=MAX_UIDS)
    studyinstanceuid = _TextList(max_items=MAX_UIDS)

    @validates_schema
    def _dates_in_order(self, data, **kwargs):
        if "start_date" in data and "end_date" in data and data["start_date"] > data["end_date"]:
            raise ValidationError("start_date is after end_date")


class _QuerySchema(Schema):
    class Meta:
        unknown = RAISE

    terms = fields.List(fields.Nested(_TermSchema), required=True, validate=validate.Length(min=1, max=100))
    filter = fields.Nested(_FilterSchema)
    returnFields = _ManyOf(tuple(METADATA_COLUMNS))


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


# --- concept expansion ----------------------------------------------------------------------------


def _semantic_groups(cuis):
    rows = db.session.execute(
        select(concept_types.c.cui, concept_types.c.semantic_group).where(in_values(concept_types.c.cui, cuis))
    )
    groups = defaultdict(set)
    for cui, group in rows:
        groups[cui].add(group)
    return groups


def expand(cui, depth=None, stop=frozenset(), only_same_group=True):
    """The concept and its narrower concepts, breadth first, each reached once (cycles end there).

    depth: levels to follow (None: all). stop: concepts left out with whatever is reached only
    through them. only_same_group: leave out, likewise, concepts whose semantic group differs from
    the queried concept's (when that has one).
    """
    if cui in stop:
        return set()
    wanted_groups = _semantic_groups([cui]).get(cui) if only_same_group else None
    found, frontier, level = {cui}, {cui}, 0
    children_of = select(concept_relations.c.child_cui, concept_types.c.semantic_group).select_from(
        concept_relations.outerjoin(concept_types, concept_types.c.cui == concept_relations.c.child_cui)
    )
    while frontier and (depth is None or level < depth):
        child_groups = defaultdict(set)
        for child, group in db.session.execute(children_of.where(in_values(concept_relations.c.parent_cui, frontier))):
            child_groups[child].add(group)
        frontier = {
            child
            for child, groups in child_groups.items()
            if child not in found and child not in stop and (not wanted_groups or groups & wanted_groups)
        }
        found |= frontier
        level += 1
    return found


# --- compiling a query ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Matcher:
    """Annotations with one of `cuis` or one of the preferred names `texts`, and the term's qualifiers."""

    term: Term
    cuis: set = dataclasses.field(default_factory=set)
    texts: list = dataclasses.field(default_factory=list)

    def empty(self):
        return not self.cuis and not self.texts

    def documents(self):
        conditions = [annotations.c.ruled_out == false()]
        if self.term.negation != "Any":
            conditions.append(annotations.c.negation == self.term.negation)
        if self.term.experiencer != "Any":
            conditions.append(annotations.c.experiencer == self.term.experiencer)
        if self.term.temporality:
            conditions.append(annotations.c.temporality.in_(self.term.temporality))
        parts = []
        if self.cuis:
            parts.append(select(annotations.c.document_id).where(in_values(annotations.c.cui, sorted(self.cuis)), *conditions))
        for text in self.texts:
            # annotation_prefs narrows the CUIs; the name itself is checked on each annotation.
            named_cuis = select(annotation_prefs.c.cui).where(annotation_prefs.c.pref_key == func.lower(text))
            parts.append(
                select(annotations.c.document_id).where(
                    annotations.c.cui.in_(named_cuis), func.lower(annotations.c.pref) == func.lower(text), *conditions
                )
            )
        return _plain(union(*parts)) if len(parts) > 1 else parts[0]


class _Resolver:
    """Turns query items into CUIs and free texts, collecting warnings."""

    def __init__(self):
        self.warnings = []
        self._mappings = {}

    def matchers(self, term):
        """(matcher of the documents the term asks for, matcher of those it excludes); None for none."""
        included, excluded = _Matcher(term), _Matcher(term)
        has_included = has_excluded = False
        for item in term.items:
            is_exclusion = term.excluded or item.startswith("-")
            has_excluded |= is_exclusion
            has_included |= not is_exclusion
            item = item.lstrip("-").strip()
            if item:
                self._resolve(item, term, excluded if is_exclusion else included)
        return (included if has_included else None), (excluded if has_excluded else None)

    def _resolve(self, item, term, matcher):
        if CUI_PATTERN.fullmatch(item):
            cui = item.upper()
            if not db.session.execute(select(concepts.c.cui).where(concepts.c.cui == cui)).first():
                self.warnings.append(f"{cui} is not in the concept dictionary: it matches only itself")
                matcher.cuis.add(cui)
                return
            matcher.cuis |= expand(cui, term.qdepth, term.qstop, term.qonlysty)
        elif SNOMED_PATTERN.fullmatch(item):
            cuis = db.session.execute(select(concept_snomed.c.cui).where(concept_snomed.c.snomed_id == item)).scalars().all()
            if not cuis:
                self.warnings.append(f"SNOMED CT id {item} is not in the concept dictionary")
            for cui in cuis:
                matcher.cuis |= expand(cui, term.qdepth, term.qstop, term.qonlysty)
        elif (mapping := self._mapping(item)) is not None:
            matcher.cuis.update(cui for cuis in mapping.values() for cui in cuis)
        else:
            matcher.texts.append(item)

    def _mapping(self, name):
        if name not in self._mappings:
            self._mappings[name] = mappings.get_mapping(name)
        return self._mappings[name]


def _plain(compound):
    """A compound SELECT as a plain SELECT of its rows: SQLite refuses a compound nested in another."""
    return select(compound.subquery().c[0])


def _combine(included, excluded):
    """SELECT of the ids of documents in every one of the `included` SELECTs and in none of `excluded`."""
    matched = _plain(intersect(*included)) if len(included) > 1 else included[0]
    if excluded:
        matched = except_(matched, _plain(union(*excluded)) if len(excluded) > 1 else excluded[0])
    return matched


def _filters(query_filter):
    conditions = []
    if "start_date" in query_filter:
        conditions.append(documents.c.content_date >= query_filter["start_date"])
    if "end_date" in query_filter:
        conditions.append(documents.c.content_date <= query_filter["end_date"])
    if "modalities" in query_filter:
        # ModalitiesInStudy is DICOM multi-valued ("CT\SR"): look for \CT\ in \CT\SR\.
        delimited = literal("\\") + documents.c.modalities_in_study + literal("\\")
        conditions.append(
            or_(*(delimited.contains(f"\\{modality.upper()}\\", autoescape=True) for modality in query_filter["modalities"]))
        )
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


def _stream(statement):
    """Rows of a statement fetched in batches (a server-side cursor on PostgreSQL)."""
    if db.engine.dialect.name == "postgresql":
        # A server-side cursor lives in a transaction; the app's connections run in autocommit.
        with db.engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
            yield from connection.execution_options(yield_per=_STREAM_BATCH).execute(statement)
            connection.rollback()
    else:
        yield from db.session.connection().execution_options(yield_per=_STREAM_BATCH).execute(statement)


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
    resolver = _Resolver()
    included, excluded = [], []
    for term in query.terms:
        term_included, term_excluded = resolver.matchers(term)
        if term_included is not None:
            included.append(term_included)
        if term_excluded is not None and not term_excluded.empty():
            excluded.append(term_excluded)
    if not included:
        raise InvalidValue("invalid_query", "a query made only of exclusions would return every document")
    if any(matcher.empty() for matcher in included):
        return Search(None, query.return_fields, resolver.warnings)
    matched = _combine([matcher.documents() for matcher in included], [matcher.documents() for matcher in excluded])
    return Search(_final_statement(matched, query), query.return_fields, resolver.warnings)


# --- full text --------------------------------------------------------------------------------------

_fts_table = table("documents_fts", literal_column("rowid"))
_WORD = re.compile(r"[^\W_]+")  # as FTS5's unicode61 tokenizer splits words: "_" is a separator


def _fulltext_ids(items):
    """SELECT of the ids of documents whose text has every word of one of the items."""
    phrases = [_WORD.findall(item) for item in items]
    if not all(phrases):
        raise InvalidValue("invalid_query", "a full-text item without any word to search for")
    if db.engine.dialect.name == "postgresql":
        tsquery = None
        for item in items:
            item_query = func.plainto_tsquery(_FULLTEXT_CONFIG, item)
            tsquery = item_query if tsquery is None else tsquery.op("||")(item_query)
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
