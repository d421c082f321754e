"""Reports to annotations with the store's own dictionary: the archive's SR instances (through the queue of
gateway.reports.jobs) and text reports that arrive without DICOM.

The annotator is built from every preferred name and synonym of the loaded dictionary, once per process, and
again when the dictionary has changed (a load replaces it as a whole, in one transaction).
"""
import logging
import time
from pathlib import Path

from sqlalchemy import func, select

from ..annotations.names import Term
from ..annotations.importer import document_fields, read_metadata
from ..annotations.store import Document, import_documents
from ..db import db
from ..models import concept_synonyms, concept_types, concepts
from ..validation import storable_text
from .jobs import annotate_job, claim, enqueue_stored, queue_state, record_failure

log = logging.getLogger(__name__)

CLAIM_BATCH = 20  # jobs a worker takes at once: a few seconds of work, and few claims
TEXT_BATCH = 200  # text reports annotated together (nlp.pipe) and written in one transaction
# How soon a worker sees a new dictionary: not at every batch, as looking reads every name of it
VERSION_CHECK_SECONDS = 10


def terms_from_store():
    """A Term for each name of each concept of the dictionary, with its concept's (first) semantic type."""
    first_type = (
        select(concept_types.c.cui, func.min(concept_types.c.sty).label("sty")).group_by(concept_types.c.cui).subquery()
    )
    named = select(concepts.c.cui, concepts.c.pref, first_type.c.sty).outerjoin(
        first_type, first_type.c.cui == concepts.c.cui)
    for cui, pref, sty in db.session.execute(named):
        yield Term(cui, pref, pref, sty)
    synonyms = named.join(concept_synonyms, concept_synonyms.c.cui == concepts.c.cui).add_columns(concept_synonyms.c.name)
    for cui, pref, sty, name in db.session.execute(synonyms):
        yield Term(cui, name, pref, sty)


def _dictionary_version():
    """What tells one loaded dictionary from another: it reads every name, so it is read once in a while."""
    names = db.session.execute(select(func.count(), func.sum(func.length(concepts.c.pref)))).one()
    synonyms = db.session.execute(select(func.count()).select_from(concept_synonyms)).scalar_one()
    return (*names, synonyms)


class StoreAnnotator:
    """The Annotator of the store's dictionary, built when first asked for and again after the dictionary changed."""

    def __init__(self):
        self._version, self._annotator, self._checked_at = None, None, None

    def current(self):
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < VERSION_CHECK_SECONDS:
            return self._annotator
        self._checked_at = now
        version = _dictionary_version()
        if version != self._version:
            # spaCy takes seconds to import: a worker that never sees a report never pays for it
            from ..annotations.annotator import Annotator

            self._annotator = Annotator(terms_from_store())
            self._version = version
            db.session.rollback()
            log.info("the report annotator is built from %s concept names", f"{version[0] + version[2]:,}")
        return self._annotator


def work_once(annotator):
    """Take a batch of queued SR instances and annotate each; how many were taken (0: the queue is empty)."""
    taken = claim(CLAIM_BATCH)
    if taken:
        current = annotator.current()
        for instance_id in taken:
            try:
                annotate_job(instance_id, current)
            except Exception as error:  # the next report must still be read; the reason is kept with the job
                db.session.rollback()
                log.warning("the report of instance %s could not be annotated: %s", instance_id, error)
                record_failure(instance_id, error)
    return len(taken)


def annotate_stored(archive_id=None, progress=None):
    """Annotate every stored SR instance (of one archive, or of all) again, here, beside any worker that
    shares the queue; (how many were queued, the QueueState after it). progress: optional callable(done, queued)."""
    queued, done, annotator = enqueue_stored(archive_id), 0, StoreAnnotator()
    while taken := work_once(annotator):
        done += taken
        if progress is not None:
            progress(min(done, queued), queued)
    return queued, queue_state()


def annotate_texts(text_dir, meta_dir=None, progress=None):
    """Annotate the text reports of a folder (NAME.txt, with NAME.json of DICOM metadata in `meta_dir`, as
    SemEHR's pipeline lays them out) and store them as documents, replacing earlier ones with the same
    SOPInstanceUID (NAME when the metadata gives none). Returns (stored, replaced). ValueError names a file
    that cannot be read, before anything is stored of its batch."""
    paths = sorted(Path(text_dir).glob("*.txt"))
    annotator, stored, replaced = StoreAnnotator().current(), 0, 0
    for start in range(0, len(paths), TEXT_BATCH):
        batch = paths[start:start + TEXT_BATCH]
        texts = [_report_text(path) for path in batch]
        documents = []
        for path, text, found in zip(batch, texts, annotator.annotate_many(texts)):
            fields = document_fields(read_metadata(Path(meta_dir) / f"{path.stem}.json") if meta_dir else {})
            fields.setdefault("sop_instance_uid", path.stem)
            documents.append(Document(annotations=found, report_text=text, **fields))
        new, again = import_documents(documents)
        stored, replaced = stored + new, replaced + again
        if progress is not None:
            progress(start + len(batch), len(paths))
    return stored, replaced


def _report_text(path):
    try:
        return storable_text(path.read_text(encoding="utf-8"), path.name)
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text") from None
