"""`gateway annotations import`: a folder of NLP result files, with their report texts and DICOM metadata."""
import collections
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..validation import read_json_file, storable_text
from .store import Document, dicom_date, import_documents, loading

# DICOM keywords a metadata file (or the NLP file's own top level) may give, and the Document field of each.
_METADATA_FIELDS = {
    "SOPInstanceUID": "sop_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "StudyInstanceUID": "study_instance_uid",
    "PatientID": "patient_id",
    "SOPClassUID": "sop_class_uid",
    "ContentDate": "content_date",
    "ModalitiesInStudy": "modalities_in_study",
}
_MAX_METADATA_LENGTH = 255
# Reading and checking a file costs about twice what writing it does, so a process per core reads
# while this one writes (up to four: beyond that the one writer sets the pace).
_READERS = min(4, os.cpu_count() or 1)
_BATCHES_AHEAD = _READERS + 1  # read or being read, not yet written: bounds the memory a long import holds


@dataclasses.dataclass
class ImportSummary:
    imported: int = 0
    replaced: int = 0
    skipped: list = dataclasses.field(default_factory=list)  # (file name, reason)


def read_document(json_path, text_dir=None, meta_dir=None):
    """The Document that one NLP result file describes; ValueError says why it cannot be imported."""
    result = read_json_file(json_path)
    if not isinstance(result, dict):
        raise ValueError("not a JSON object")
    if "annotations" not in result:
        # e.g. a metadata file: it would be stored as a document without annotations
        raise ValueError("no 'annotations': not an NLP result")
    parts = {}
    for key in ("annotations", "phenotypes", "sentences"):
        value = result.get(key, [])
        if not isinstance(value, list):
            raise ValueError(f"'{key}' is not a list")
        parts[key] = value

    metadata = {keyword: result[keyword] for keyword in _METADATA_FIELDS if keyword in result}
    if meta_dir is not None:
        metadata.update(read_metadata(Path(meta_dir) / (json_path.stem + ".json")))
    fields = document_fields(metadata)
    fields.setdefault("sop_instance_uid", json_path.stem)

    if text_dir is not None:
        text_path = Path(text_dir) / (json_path.stem + ".txt")
        if not text_path.exists():
            raise ValueError(f"no {text_path.name} in the text folder")
        try:
            fields["report_text"] = storable_text(text_path.read_text(encoding="utf-8"), text_path.name)
        except UnicodeDecodeError:
            raise ValueError(f"{text_path.name} is not UTF-8 text") from None
    return Document(**parts, **fields)


def read_metadata(meta_path):
    """The DICOM metadata (by keyword) of a metadata file, as SemEHR's pipeline writes one beside a report;
    {} when there is no such file."""
    if not meta_path.exists():
        return {}
    meta = read_json_file(meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path.name} is not a JSON object")
    return {keyword: meta[keyword] for keyword in _METADATA_FIELDS if keyword in meta}


def document_fields(metadata):
    """Document's keyword arguments of DICOM metadata by keyword; ValueError names a value it cannot store."""
    fields = {}
    for keyword, value in metadata.items():
        if value is None or value == "":
            continue
        storable_text(value, keyword, _MAX_METADATA_LENGTH)
        fields[_METADATA_FIELDS[keyword]] = dicom_date(value) if keyword == "ContentDate" else value
    return fields


def import_folder(json_dir, text_dir=None, meta_dir=None, batch_size=5000, progress=None):
    """Import every *.json of json_dir; a bad file is reported in the summary and skipped.

    Reader processes read and check the files while this one writes the batches they made before;
    at most a few batches wait between them.
    progress: called with the number of files handled since its last call.
    """
    for folder in (json_dir, text_dir, meta_dir):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{folder} is not a folder")
    paths = sorted(Path(json_dir).glob("*.json"))
    chunks = (paths[start : start + batch_size] for start in range(0, len(paths), batch_size))
    summary = ImportSummary()
    known_prefs = set()
    with loading(len(paths)), ProcessPoolExecutor(max_workers=_READERS) as readers:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(readers.submit(_read_documents, chunk, text_dir, meta_dir))
            if len(pending) > _BATCHES_AHEAD:
                _write(pending.popleft().result(), summary, known_prefs, progress)
        while pending:
            _write(pending.popleft().result(), summary, known_prefs, progress)
    return summary


def _write(read, summary, known_prefs, progress):
    documents, skipped, handled = read
    summary.skipped.extend(skipped)
    if documents:
        imported, replaced = import_documents(documents, known_prefs)
        summary.imported += imported
        summary.replaced += replaced
    if progress:
        progress(handled)


def _read_documents(paths, text_dir, meta_dir):
    """(Documents, skipped files with their reasons, number of files) of some NLP result files."""
    documents, skipped = [], []
    for json_path in paths:
        try:
            documents.append(read_document(json_path, text_dir, meta_dir))
        except (OSError, ValueError) as error:
            skipped.append((json_path.name, str(error)))
    return documents, skipped, len(paths)
