"""Named mappings: a name (the file stem) for a set of terms, each standing for a list of CUIs.

Two sources: mappings stored by `gateway mappings load DIR`, and the JSON files of
GATEWAY_MAPPINGS_DIR, read by the server itself (a file added there is seen at once).
A stored mapping wins over a file of the same name.
"""
import logging
from pathlib import Path

from flask import current_app
from sqlalchemy import delete, insert, select

from ..db import db, in_values, write_transaction
from ..models import mapping_entries, mappings
from ..validation import read_json_file, storable_text
from .store import CUI_PATTERN

log = logging.getLogger(__name__)

# Parsed files of the mappings folder by path, with the modification time they were read at.
_file_cache = {}


def parse_mapping(data, source):
    """{term: [CUI, ...]} from a mapping file's JSON ({term: [CUI or "CUI\\tPREF\\tSTY", ...]})."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a mapping is a JSON object of term: [CUI, ...]")
    terms = {}
    for term, entries in data.items():
        if not isinstance(entries, list) or not all(isinstance(entry, str) and entry.strip() for entry in entries):
            raise ValueError(f"{source}: term {term!r} does not map to a list of CUIs")
        storable_text(term, f"{source}: term {term[:20]!r}", mapping_entries.c.term.type.length)
        cuis = [entry.split("\t", 1)[0].strip() for entry in entries]
        for cui in cuis:
            if not CUI_PATTERN.fullmatch(cui):
                raise ValueError(f"{source}: term {term!r}: {cui[:20]!r} is not a CUI")
        terms[term] = list(dict.fromkeys(cui.upper() for cui in cuis))
    return terms


def read_mapping_file(path):
    return parse_mapping(read_json_file(path), Path(path).name)


def load_mappings(directory):
    """Store every *.json of directory as a mapping named by its stem (replacing one of that name).

    All files are read before anything is written: one bad file stores none.
    Returns {name: number of terms}.
    """
    paths = sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else None
    if not paths:
        raise ValueError(f"no mapping files (*.json) in {directory}")
    parsed = {path.stem: read_mapping_file(path) for path in paths}
    with write_transaction() as session:
        for name, terms in parsed.items():
            session.execute(delete(mappings).where(mappings.c.name == name))
            mapping_id = session.execute(insert(mappings).values(name=name).returning(mappings.c.id)).scalar_one()
            rows = [{"mapping_id": mapping_id, "term": term, "cui": cui} for term, cuis in terms.items() for cui in cuis]
            if rows:
                session.execute(insert(mapping_entries), rows)
    return {name: len(terms) for name, terms in parsed.items()}


def _folder_mappings():
    """{name: path} of the mapping files in GATEWAY_MAPPINGS_DIR."""
    folder = current_app.config.get("MAPPINGS_DIR")
    if not folder or not Path(folder).is_dir():
        return {}
    return {path.stem: path for path in Path(folder).glob("*.json")}


def _read_folder_mapping(path):
    """A folder file's terms, parsed again only when it changed; None (and a log line) if it is bad."""
    try:
        modified = path.stat().st_mtime_ns
        cached = _file_cache.get(path)
        if cached is None or cached[0] != modified:
            cached = (modified, read_mapping_file(path))
            _file_cache[path] = cached
        return cached[1]
    except (OSError, ValueError) as error:
        log.warning("mapping file %s left out: %s", path.name, error)
        return None


def mapping_names():
    stored = db.session.execute(select(mappings.c.name)).scalars().all()
    return sorted(set(stored) | set(_folder_mappings()))


def get_mapping(name):
    """{term: [CUI, ...]} of the named mapping, or None when there is none of that name."""
    return get_mappings([name])[name]


def get_mappings(names):
    """{name: {term: [CUI, ...]} or None} for each of `names`: the stored ones read in one statement."""
    found = dict.fromkeys(names)
    stored = db.session.execute(
        select(mappings.c.name, mapping_entries.c.term, mapping_entries.c.cui)
        .outerjoin(mapping_entries, mapping_entries.c.mapping_id == mappings.c.id)
        .where(in_values(mappings.c.name, found))
        .order_by(mappings.c.name, mapping_entries.c.term, mapping_entries.c.cui)
    )
    for name, term, cui in stored:
        if found[name] is None:
            found[name] = {}  # stored, so a mapping even without terms
        if term is not None:
            found[name].setdefault(term, []).append(cui)
    missing = [name for name, terms in found.items() if terms is None]
    if missing:
        folder = _folder_mappings()
        for name in missing:
            if name in folder:
                found[name] = _read_folder_mapping(folder[name])
    return found
