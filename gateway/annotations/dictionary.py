"""The concept dictionary that expands annotation queries: UMLS concepts with their English preferred
names, semantic types and groups, narrower concepts and SNOMED CT ids.

Three sources fill it, and each load replaces the whole dictionary in one write transaction, so a load
that fails leaves the previous dictionary as it was:

- the UMLS Metathesaurus RRF files MRCONSO, MRSTY and MRREL (`load_umls`);
- the pipe-separated cui.csv, rel.csv, snomed.csv and sty.csv of existing SemEHR annotation-service
  deployments (`load_semehr_csv`), as the SMI branch of CogStack-SemEHR writes them (umls/umls_to_csv.py)
  and its RESTful_service/umls.py reads them;
- a small built-in radiology sample in that CSV format (`load_sample`).

Files are streamed line by line and written in batches. A missing file or a malformed line is a
ValueError that names the file and the line.
"""
import functools
import re
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import delete, func, select

from ..db import db, in_values, insert_ignoring_conflicts, write_transaction
from ..models import concept_relations, concept_snomed, concept_synonyms, concept_types, concepts
from .names import name_key

SEMANTIC_GROUPS_PATH = Path(__file__).with_name("semantic_groups.txt")
SAMPLE_DIRECTORY = Path(__file__).with_name("sample_dictionary")
DEFAULT_SOURCES = ("MTH", "SNOMEDCT_US")
BATCH_ROWS = 5000
# MRREL relations that make CUI2 narrower than CUI1 ("REL: relationship of the second concept to the first").
NARROWER_RELATIONS = frozenset({"RN", "CHD"})
# SNOMED CT codes of obsolete (O) or editor-suppressed (E) atoms are left out: they name retired or
# wrongly placed SNOMED concepts. Suppressible (Y) atoms are kept: that flag marks a name, not the code.
SUPPRESSED_SNOMED_ATOMS = frozenset({"O", "E"})
# Longer English names are no synonym that a report's text would hold (and no key its index could).
MAX_SYNONYM_LENGTH = concept_synonyms.c.name.type.length
_PROGRESS_STEP_BYTES = 1 << 20

_CUI = re.compile(r"C\d{1,15}")
_SNOMED_ID = re.compile(r"\d{1,18}")
_TUI = re.compile(r"T\d{3}")


class SemanticGroups(NamedTuple):
    """NLM's Semantic Groups table: each semantic type (TUI and name) and the group it belongs to."""

    group_of_tui: dict
    group_of_type: dict
    type_of_tui: dict


@functools.cache
def semantic_groups():
    """The shipped semantic_groups.txt (NLM's SemGroups.txt: `GROUP|Group name|TUI|Type name`)."""
    group_of_tui, group_of_type, type_of_tui = {}, {}, {}
    for line in SEMANTIC_GROUPS_PATH.read_text(encoding="utf-8").splitlines():
        group, _group_name, tui, type_name = line.split("|")
        group_of_tui[tui] = group_of_type[type_name] = group
        type_of_tui[tui] = type_name
    return SemanticGroups(group_of_tui, group_of_type, type_of_tui)


class DictionarySummary(NamedTuple):
    concepts: int
    types: int
    relations: int
    snomed_ids: int
    synonyms: int

    def __str__(self):
        return (f"{self.concepts} concepts, {self.types} semantic types, {self.relations} narrower relations, "
                f"{self.snomed_ids} SNOMED CT ids, {self.synonyms} synonyms")


def dictionary_summary():
    """How many rows each dictionary table holds."""
    tables = (concepts, concept_types, concept_relations, concept_snomed, concept_synonyms)
    return DictionarySummary(*(db.session.scalar(select(func.count()).select_from(table)) for table in tables))


# --- reading pipe-separated files ------------------------------------------------------------------


class _FileFormat(NamedTuple):
    name: str
    columns: int
    header: str = None  # a first line that names the columns, skipped
    trailing_separator: bool = False  # RRF lines end with '|'


MRCONSO = _FileFormat("MRCONSO.RRF", 18, trailing_separator=True)
MRSTY = _FileFormat("MRSTY.RRF", 6, trailing_separator=True)
MRREL = _FileFormat("MRREL.RRF", 16, trailing_separator=True)
STY_CSV = _FileFormat("sty.csv", 3, header="tui|tuigroup|tuigrouplabel")
CUI_CSV = _FileFormat("cui.csv", 4, header="cui|tui|tuigroup|cuilabel")
SNOMED_CSV = _FileFormat("snomed.csv", 2, header="snomed|cui")
REL_CSV = _FileFormat("rel.csv", 3, header="cui1|has|cui2")


def _malformed(file_format, line_number, reason):
    return ValueError(f"{file_format.name} line {line_number}: {reason}")


def _valid(pattern, value, what, file_format, line_number):
    if not pattern.fullmatch(value):
        raise _malformed(file_format, line_number, f"{what} {value!r} is not valid")
    return value


class _Progress:
    """Bytes read so far across a load's files, reported as (done, total) about every megabyte."""

    def __init__(self, paths, report):
        self.total = sum(path.stat().st_size for path in paths)
        self.done = self._reported = 0
        self._report = report

    def advance(self, size):
        self.done += size
        if self.done - self._reported >= _PROGRESS_STEP_BYTES:
            self.report()

    def report(self):
        self._reported = self.done
        if self._report:
            self._report(self.done, self.total)


class _Reader:
    """The files of one load: found before anything is written, then read one line at a time."""

    def __init__(self, directory, formats, report):
        directory = Path(directory)
        self.paths = {}
        for file_format in formats:
            path = directory / file_format.name
            if not path.is_file():
                raise ValueError(f"no {file_format.name} in {directory}")
            self.paths[file_format] = path
        self.progress = _Progress(self.paths.values(), report)

    def records(self, file_format):
        """(line number, fields) for each non-empty line; a line that is not UTF-8 or has another
        number of fields is a ValueError."""
        expected = file_format.columns + file_format.trailing_separator
        with self.paths[file_format].open("rb") as source:
            for number, raw in enumerate(source, 1):
                self.progress.advance(len(raw))
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise _malformed(file_format, number, "not UTF-8") from None
                if not line or (number == 1 and line.lower() == file_format.header):
                    continue
                fields = line.split("|")
                if len(fields) != expected or (file_format.trailing_separator and fields[-1]):
                    found = len(fields) - file_format.trailing_separator
                    raise _malformed(file_format, number, f"{found} fields where {file_format.columns} are expected")
                yield number, fields[:file_format.columns]


# --- writing ---------------------------------------------------------------------------------------

_TABLES_IN_WRITE_ORDER = (concepts, concept_synonyms, concept_types, concept_snomed, concept_relations)


class _Batches:
    """Rows waiting to be written, BATCH_ROWS at a time.

    Every table is flushed at once and concepts first, so a type never reaches the database before its
    concept. Rows of the `named_only` tables whose concept has no English name are dropped (relations keep
    both ends whatever they are: their table has no foreign keys). A row already written (the same
    relation from two sources, say) is skipped.
    """

    def __init__(self, named_only):
        self._statements = {table: insert_ignoring_conflicts(table) for table in _TABLES_IN_WRITE_ORDER}
        self._pending = {table: [] for table in _TABLES_IN_WRITE_ORDER}
        self._named_only = named_only

    def add(self, table, **row):
        rows = self._pending[table]
        rows.append(row)
        if len(rows) >= BATCH_ROWS:
            self.flush()

    def flush(self):
        for table, rows in self._pending.items():
            if table in self._named_only:
                rows[:] = _of_named_concepts(rows)
            if rows:
                db.session.execute(self._statements[table], rows)
                rows.clear()


def _of_named_concepts(rows):
    cuis = {row["cui"] for row in rows}
    if not cuis:
        return []
    named = set(db.session.scalars(select(concepts.c.cui).where(in_values(concepts.c.cui, cuis))))
    return [row for row in rows if row["cui"] in named]


def _replace_dictionary(reader, fill, named_only):
    """Empty the dictionary and let `fill(batches)` load the new one, all in one transaction."""
    with write_transaction():
        for table in reversed(_TABLES_IN_WRITE_ORDER):
            db.session.execute(delete(table))
        batches = _Batches(named_only)
        fill(batches)
        batches.flush()
        reader.progress.report()
        return dictionary_summary()


# --- UMLS RRF files --------------------------------------------------------------------------------


def load_umls(directory, sources=DEFAULT_SOURCES, progress=None):
    """Replace the dictionary with the UMLS Metathesaurus files MRCONSO.RRF, MRSTY.RRF and MRREL.RRF.

    A concept is a CUI with an English name: its preferred one (LAT=ENG, TS=P, STT=PF, ISPREF=Y), else the
    first English one; its other English names that are not suppressed (SUPPRESS=N) are its synonyms, which
    the report annotator matches too. MRCONSO.RRF must be sorted by CUI, as the UMLS ships it, so that a concept's rows
    are read together without holding the file. SNOMED CT ids are the CODE of SNOMEDCT_US atoms (see
    SUPPRESSED_SNOMED_ATOMS). Narrower relations are the RN and CHD rows of MRREL whose SAB is one of
    `sources` (CUI2 narrower than CUI1), self-relations left out.

    progress: optional callable(bytes read, bytes in all). Returns a DictionarySummary.
    """
    reader = _Reader(directory, (MRCONSO, MRSTY, MRREL), progress)
    sources = frozenset(sources)

    def fill(batches):
        _read_mrconso(reader, batches)
        _read_mrsty(reader, batches)
        _read_mrrel(reader, batches, sources)

    # MRSTY types every CUI; SNOMED CT ids come from English rows, so their concept has a name
    return _replace_dictionary(reader, fill, named_only={concept_types})


class _MrconsoConcept:
    """What the MRCONSO rows of one CUI say: its English name and its SNOMED CT ids."""

    def __init__(self, cui):
        self.cui = cui
        self.name = None
        self.name_is_preferred = False
        self.snomed_ids = set()
        self.names = {}  # every English name not suppressed, by the key the annotator matches it by

    def read(self, fields, line_number):
        language, term_status, _lui, string_type, _sui, is_preferred = fields[1:7]
        source, code, name, suppress = fields[11], fields[13], fields[14], fields[16]
        if language != "ENG":
            return
        preferred = (term_status, string_type, is_preferred) == ("P", "PF", "Y")
        if self.name is None or (preferred and not self.name_is_preferred):
            self.name, self.name_is_preferred = name, preferred
        if suppress == "N" and len(name) <= MAX_SYNONYM_LENGTH:
            self.names.setdefault(name_key(name), name)
        if source == "SNOMEDCT_US" and suppress not in SUPPRESSED_SNOMED_ATOMS:
            self.snomed_ids.add(_valid(_SNOMED_ID, code, "SNOMED CT id", MRCONSO, line_number))

    def write(self, batches):
        if self.name is None:
            return
        batches.add(concepts, cui=self.cui, pref=self.name)
        self.names.pop(name_key(self.name), None)
        for synonym in self.names.values():
            batches.add(concept_synonyms, cui=self.cui, name=synonym)
        for snomed_id in sorted(self.snomed_ids):
            batches.add(concept_snomed, snomed_id=snomed_id, cui=self.cui)


def _read_mrconso(reader, batches):
    concept = None
    for number, fields in reader.records(MRCONSO):
        cui = _valid(_CUI, fields[0], "CUI", MRCONSO, number)
        if concept is None or cui != concept.cui:
            if concept is not None:
                if cui < concept.cui:
                    raise _malformed(MRCONSO, number, f"{cui} after {concept.cui}: the file must be sorted by CUI")
                concept.write(batches)
            concept = _MrconsoConcept(cui)
        concept.read(fields, number)
    if concept is not None:
        concept.write(batches)


def _read_mrsty(reader, batches):
    group_of_tui = semantic_groups().group_of_tui
    for number, (cui, tui, _stn, type_name, _atui, _cvf) in reader.records(MRSTY):
        if tui not in group_of_tui:
            raise _malformed(MRSTY, number, f"semantic type {tui!r} is not in the semantic groups table")
        batches.add(concept_types, cui=_valid(_CUI, cui, "CUI", MRSTY, number), sty=type_name, tui=tui,
                    semantic_group=group_of_tui[tui])


def _read_mrrel(reader, batches, sources):
    for number, fields in reader.records(MRREL):
        parent, relation, child, source = fields[0], fields[3], fields[4], fields[10]
        if relation in NARROWER_RELATIONS and source in sources and parent != child:
            batches.add(concept_relations, parent_cui=_valid(_CUI, parent, "CUI1", MRREL, number),
                        child_cui=_valid(_CUI, child, "CUI2", MRREL, number))


# --- SemEHR CSV files ------------------------------------------------------------------------------


def load_semehr_csv(directory, progress=None):
    """Replace the dictionary with the cui.csv, rel.csv, snomed.csv and sty.csv of a SemEHR deployment.

    Each file starts with a header line (skipped) and has no quoting:
    - sty.csv `tui|tuigroup|tuigrouplabel`: the semantic group of each TUI;
    - cui.csv `cui|tui|tuigroup|cuilabel`: the English name and comma-separated TUIs of a CUI (tuigroup,
      derived from the TUIs, is ignored); a CUI without a label has no English name and is left out;
      the semantic type names come from the shipped semantic groups table;
    - snomed.csv `snomed|cui`;
    - rel.csv `cui1|has|cui2`: with `has` RN, cui2 is a comma-separated list of CUIs narrower than
      cui1; other rows are ignored, as the deployments' service does.

    progress: optional callable(bytes read, bytes in all). Returns a DictionarySummary.
    """
    reader = _Reader(directory, (STY_CSV, CUI_CSV, SNOMED_CSV, REL_CSV), progress)

    def fill(batches):
        group_of_tui = _read_sty_csv(reader)
        _read_cui_csv(reader, batches, group_of_tui)
        _read_snomed_csv(reader, batches)
        _read_rel_csv(reader, batches)

    # types are read with their concept's name; snomed.csv lists CUIs that cui.csv may leave unnamed
    return _replace_dictionary(reader, fill, named_only={concept_snomed})


def load_sample(progress=None):
    """Replace the dictionary with the built-in radiology sample (sample_dictionary/, SemEHR CSV files)."""
    return load_semehr_csv(SAMPLE_DIRECTORY, progress)


def _read_sty_csv(reader):
    known_groups = set(semantic_groups().group_of_tui.values())
    group_of_tui = {}
    for number, (tui, group, _group_name) in reader.records(STY_CSV):
        if group not in known_groups:
            raise _malformed(STY_CSV, number, f"semantic group {group!r} is not one of the UMLS semantic groups")
        group_of_tui[_valid(_TUI, tui, "TUI", STY_CSV, number)] = group
    return group_of_tui


def _read_cui_csv(reader, batches, group_of_tui):
    type_of_tui = semantic_groups().type_of_tui
    for number, (cui, tuis, _groups, name) in reader.records(CUI_CSV):
        cui = _valid(_CUI, cui, "CUI", CUI_CSV, number)
        if not name:
            continue
        batches.add(concepts, cui=cui, pref=name)
        for tui in filter(None, tuis.split(",")):
            if tui not in group_of_tui:
                raise _malformed(CUI_CSV, number, f"semantic type {tui!r} is not in sty.csv")
            if tui not in type_of_tui:
                raise _malformed(CUI_CSV, number, f"semantic type {tui!r} is not in the semantic groups table")
            batches.add(concept_types, cui=cui, sty=type_of_tui[tui], tui=tui, semantic_group=group_of_tui[tui])


def _read_snomed_csv(reader, batches):
    for number, (snomed_id, cui) in reader.records(SNOMED_CSV):
        batches.add(concept_snomed, snomed_id=_valid(_SNOMED_ID, snomed_id, "SNOMED CT id", SNOMED_CSV, number),
                    cui=_valid(_CUI, cui, "CUI", SNOMED_CSV, number))


def _read_rel_csv(reader, batches):
    for number, (parent, relation, children) in reader.records(REL_CSV):
        if relation != "RN":
            continue
        parent = _valid(_CUI, parent, "CUI", REL_CSV, number)
        for child in children.split(","):
            if _valid(_CUI, child, "CUI", REL_CSV, number) != parent:
                batches.add(concept_relations, parent_cui=parent, child_cui=child)
