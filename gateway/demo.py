"""`gateway demo`: the demo user, projects, archives and DICOM instances that the docs' examples use,
and the annotation side: the sample concept dictionary, a mapping and annotated reports of demo instances.

Seeding is idempotent: what exists is left as it is, and the generated files are deterministic, so
storing them again is a no-op.
"""
import dataclasses
import datetime
import io
import json
import struct
import zlib
from pathlib import Path

from sqlalchemy import select

from . import archive as archive_store
from .annotations.dictionary import load_sample
from .annotations.mappings import load_mappings
from .annotations.store import Document, dicom_date, import_documents
from .auth.users import create_user, grant
from .db import db, in_values
from .forms import create_form
from .models import concepts, documents, forms, mappings, projects, series_results, users
from .projects import add_member, archive_by_name, create_archive, create_project
from .results import add_result
from .synthetic import CT_IMAGE_STORAGE, DEMO_UID_ROOT, SECONDARY_CAPTURE_STORAGE, make_instance

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_ARCHIVE = "main"

# Series of the generated patients of project demo, by patient number modulo 4.
_REPORT_SERIES = (
    ((1, "CR", "Chest PA", 1),),
    ((1, "CT", "Chest CT", 1),),
    ((1, "CR", "Chest PA", 1), (2, "CT", "Chest CT", 1)),
    ((1, "DX", "Chest AP portable", 1),),
)
# Thirty more patients with one chest study each, every 83 days from 2017-01-01: material for the reports.
_REPORT_PATIENTS = tuple(
    (
        f"DEMO-{number + 3:03d}",
        f"Patient^{number + 3:03d}",
        "FM"[number % 2],
        f"{1940 + number}0615",
        ((1, (datetime.date(2017, 1, 1) + datetime.timedelta(days=83 * number)).strftime("%Y%m%d"),
          _REPORT_SERIES[number % 4]),),
    )
    for number in range(30)
)

# (project, kind, patients); a patient is (PatientID, name, sex, birth date, studies);
# a study is (number, date, series); a series is (number, modality, description, instance count).
DEMO_CONTENT = (
    (
        "demo",
        "cad4tb",
        (
            ("DEMO-001", "Doe^Jane", "F", "19700412", ((1, "20240102", ((1, "CR", "Chest PA", 1), (2, "CT", "Chest CT", 3))),)),
            ("DEMO-002", "Roe^Richard", "M", "19581130", ((1, "20240215", ((1, "CR", "Chest PA", 1),)),)),
            *_REPORT_PATIENTS,
        ),
    ),
    (
        "retina-demo",
        "retina",
        (("RET-001", "Poe^Anna", "F", "19650704", ((1, "20240301", ((1, "OP", "Fundus left and right", 2),)),)),),
    ),
)


def demo_uid(*parts):
    return DEMO_UID_ROOT + ".".join(str(part) for part in parts)


def _ensure_account():
    exists = db.session.execute(select(users.c.id).where(users.c.username == DEMO_USER)).first()
    if not exists:
        create_user(DEMO_USER, "demo@example.org", DEMO_PASSWORD)
        yield f"user {DEMO_USER} created (password {DEMO_PASSWORD!r}: change it with 'gateway user set-password')"
    grant(DEMO_USER, ["all"])


def _ensure_archive(project, kind):
    if not db.session.execute(select(projects.c.id).where(projects.c.name == project)).first():
        create_project(project, kind)
        create_archive(project, DEMO_ARCHIVE)
        yield f"project {project} ({kind}) with archive {DEMO_ARCHIVE} created"
    add_member(project, DEMO_USER, can_upload=True)


def store_bytes(archive, data, filename):
    """Store one file's bytes as if it had been uploaded."""
    with archive_store.storage().spooled(io.BytesIO(data)) as (handle, size):
        return archive_store.store_instance(archive, handle, size, filename)


# The SOP Class of each demo modality's images. The fundus photographs are Secondary Capture: their pixels
# are the generator's 16-bit greyscale, which the ophthalmic photography classes do not allow.
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": CT_IMAGE_STORAGE,
    "OP": SECONDARY_CAPTURE_STORAGE,
}


def demo_instances(project_index, patient_number, patient):
    patient_id, name, sex, birth_date, studies = patient
    for study_number, study_date, series_list in studies:
        study_uid = demo_uid(project_index, patient_number, study_number)
        for series_number, modality, description, count in series_list:
            series_uid = demo_uid(project_index, patient_number, study_number, series_number)
            for instance_number in range(1, count + 1):
                sop_uid = demo_uid(project_index, patient_number, study_number, series_number, instance_number)
                yield sop_uid, make_instance(
                    patient_id,
                    study_uid,
                    series_uid,
                    sop_uid,
                    modality=modality,
                    sop_class_uid=SOP_CLASSES[modality],
                    patient_name=name,
                    patient_sex=sex,
                    patient_birth_date=birth_date,
                    study_date=study_date,
                    study_description="Demo study",
                    series_description=description,
                    instance_number=instance_number,
                    pixel_seed=instance_number,
                )


DEMO_FORM = "Chest X-ray reading"
DEMO_FORM_DEFINITION = {
    "fields": [
        {"name": "quality", "label": "Image quality", "type": "choice", "required": True,
         "choices": ["good", "acceptable", "poor"]},
        {"name": "tb_suspected", "label": "TB suspected", "type": "boolean", "required": True},
        {"name": "score", "label": "Reader score (0-100)", "type": "integer", "required": False},
        {"name": "lesion_size_mm", "label": "Largest lesion (mm)", "type": "number", "required": False},
        {"name": "read_on", "label": "Read on", "type": "date", "required": False},
        {"name": "remarks", "label": "Remarks", "type": "string", "required": False},
    ]
}
# (project, series keys, results): a result is (name, algorithm, value or bytes of a PNG file)
DEMO_RESULTS = (
    ("demo", ("DEMO-001", (1, 1, 1), (1, 1, 1, 1)), (
        ("CAD4TB 5", "CAD4TB", "12.345"),
        ("CAD4TB 6", "CAD4TB", "87"),
        ("Finding", "CAD4TB", "consolidation right upper lobe"),
        ("Heatmap", "CAD4TB", "png"),
    )),
    ("retina-demo", ("RET-001", (2, 1, 1), (2, 1, 1, 1, 1)), (
        ("DR grade", "RetCAD", "2"),
        ("Referable", "RetCAD", "yes"),
        ("Heatmap", "RetCAD", "png"),
    )),
)


def demo_png(size=16):
    """A small grey-gradient PNG, written with zlib alone."""
    rows = b"".join(b"\x00" + bytes((x * 16 + y * 8) % 256 for x in range(size)) for y in range(size))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _ensure_results():
    for project, (patient_id, study, series_parts), seeded_results in DEMO_RESULTS:
        archive = archive_by_name(project, DEMO_ARCHIVE)
        keys = (patient_id, demo_uid(*study), demo_uid(*series_parts))
        series_row = archive_store.find_series(archive, *keys)
        has_results = db.session.execute(
            select(series_results.c.id).where(series_results.c.series_pk == series_row.id)
        ).first()
        if has_results:
            continue
        for name, algorithm, value in seeded_results:
            if value == "png":
                with archive_store.storage().spooled(io.BytesIO(demo_png())) as (handle, size):
                    add_result(archive, *keys, archive.project_kind, name, algorithm, upload=(handle, "heatmap.png", size))
            else:
                add_result(archive, *keys, archive.project_kind, name, algorithm, value=value)
        yield f"project {project}: {len(seeded_results)} results on series {keys[2]}"


def _ensure_form():
    exists = db.session.execute(
        select(forms.c.id).join(projects, projects.c.id == forms.c.project_id)
        .where(projects.c.name == "demo", forms.c.name == DEMO_FORM)
    ).first()
    if not exists:
        create_form("demo", DEMO_FORM, json.dumps(DEMO_FORM_DEFINITION))
        yield f"form {DEMO_FORM!r} created in project demo"


DEMO_MAPPINGS_DIR = Path(__file__).resolve().parent / "annotations" / "demo_mappings"
DEMO_MAPPING = "chest findings"
_BODY_LOCATION, _BODY_PART = "Body Location or Region", "Body Part, Organ, or Organ Component"
_DISEASE, _FINDING, _INJURY = "Disease or Syndrome", "Finding", "Injury or Poisoning"


@dataclasses.dataclass(frozen=True)
class _Finding:
    """A report sentence with its annotated words in [brackets], and the annotation of those words."""

    sentence: str
    cui: str
    pref: str
    sty: str
    negation: str = "Affirmed"
    experiencer: str = "Patient"
    temporality: str = "Recent"
    ruled_by: tuple = ()


# Sentences of the demo reports, with concepts of the sample dictionary (annotations/sample_dictionary).
DEMO_FINDINGS = (
    _Finding("The [chest wall] is intact.", "C0205076", "Chest wall", _BODY_LOCATION),
    _Finding("Small right [pleural effusion].", "C0032227", "Pleural effusion disorder", _DISEASE),
    _Finding("No [pneumothorax].", "C0032326", "Pneumothorax", _DISEASE, negation="Negated"),
    _Finding("Consolidation of the right lower lobe in keeping with [pneumonia].", "C0032285", "Pneumonia", _DISEASE),
    _Finding("Old healed [rib fractures] on the left.", "C0035522", "Rib Fractures", _INJURY,
             temporality="historical"),
    _Finding("The heart is enlarged ([cardiomegaly]).", "C0018800", "Cardiomegaly", _DISEASE),
    _Finding("No sign of [pulmonary edema].", "C0034063", "Pulmonary Edema", _DISEASE, negation="Negated"),
    _Finding("A 6 mm [lung nodule] in the left upper lobe.", "C0034079", "Lung nodule", _FINDING),
    _Finding("CT advised to exclude [lung cancer].", "C0242379", "Malignant neoplasm of lung", "Neoplastic Process",
             temporality="hypothetical"),
    _Finding("History of [pulmonary tuberculosis].", "C0041327", "Tuberculosis, Pulmonary", _DISEASE,
             temporality="historical"),
    _Finding("The patient's mother had [tuberculosis].", "C0041296", "Tuberculosis", _DISEASE, experiencer="Other"),
    _Finding("Plate [atelectasis] at the left base.", "C0004144", "Atelectasis", _DISEASE),
    _Finding("The [sternum] is unremarkable.", "C0038293", "Sternum", _BODY_PART),
    _Finding("Degenerative change of the [thoracic spine].", "C0581269", "Thoracic spine", _BODY_PART),
    _Finding("Referred with [chest pain].", "C0008031", "Chest Pain", "Sign or Symptom"),
    _Finding("Hyperinflated lungs consistent with [pulmonary emphysema].", "C0034067", "Pulmonary Emphysema", _DISEASE),
    _Finding("A [chest wall] mass cannot be excluded.", "C0205076", "Chest wall", _BODY_LOCATION,
             temporality="hypothetical"),
    _Finding("No acute [rib fractures].", "C0035522", "Rib Fractures", _INJURY, negation="Negated"),
    _Finding("The [trachea] is central.", "C0040578", "Trachea", _BODY_PART),
    # the NLP post-processing rules this mention out: it names a vaccine, not the disease
    _Finding("[Pneumonia] vaccination is up to date.", "C0032285", "Pneumonia", _DISEASE,
             ruled_by=("not_mention_filters.json",)),
)


def _report(header, findings):
    """(text, annotations, sentences) of a report made of a header line and finding sentences."""
    text, annotations, sentences = header + "\n", [], []
    for finding in findings:
        before, rest = finding.sentence.split("[")
        words, after = rest.split("]")
        start = len(text) + len(before)
        annotations.append({
            "start": start, "end": start + len(words), "str": words, "id": f"cui-{len(annotations) + 1}",
            "cui": finding.cui, "pref": finding.pref, "sty": finding.sty, "negation": finding.negation,
            "experiencer": finding.experiencer, "temporality": finding.temporality, "study_concepts": [],
            "ruled_by": list(finding.ruled_by),
        })
        sentences.append({"start": len(text), "end": len(text) + len(before + words + after)})
        text += before + words + after + " "
    return text.rstrip() + "\n", annotations, sentences


def demo_documents():
    """The annotated reports: one per series of project demo, keyed by the series' first instance."""
    _project, _kind, patient_list = DEMO_CONTENT[0]
    project_index, number = 1, 0
    for patient_number, (patient_id, _name, _sex, _birth, studies) in enumerate(patient_list, start=1):
        for study_number, study_date, series_list in studies:
            modalities = "\\".join(sorted({modality for _, modality, _, _ in series_list}))
            for series_number, modality, description, _count in series_list:
                # three findings apart in the table: every report differs from its neighbours
                findings = [DEMO_FINDINGS[(number + step) % len(DEMO_FINDINGS)] for step in (0, 7, 13)]
                text, annotations, sentences = _report(f"{description.upper()} ({modality})", findings)
                yield Document(
                    demo_uid(project_index, patient_number, study_number, series_number, 1),
                    annotations,
                    sentences=sentences,
                    report_text=text,
                    series_instance_uid=demo_uid(project_index, patient_number, study_number, series_number),
                    study_instance_uid=demo_uid(project_index, patient_number, study_number),
                    patient_id=patient_id,
                    sop_class_uid=SOP_CLASSES[modality],
                    content_date=dicom_date(study_date),
                    modalities_in_study=modalities,
                )
                number += 1


def _ensure_annotation_data():
    if db.session.execute(select(concepts.c.cui).limit(1)).first() is None:
        yield f"sample concept dictionary loaded: {load_sample()}"
    if db.session.execute(select(mappings.c.id).where(mappings.c.name == DEMO_MAPPING)).first() is None:
        for name, term_count in load_mappings(DEMO_MAPPINGS_DIR).items():
            yield f"mapping {name!r} loaded ({term_count} terms)"
    reports = list(demo_documents())
    stored = set(db.session.execute(
        select(documents.c.sop_instance_uid)
        .where(in_values(documents.c.sop_instance_uid, [report.sop_instance_uid for report in reports]))
    ).scalars())
    missing = [report for report in reports if report.sop_instance_uid not in stored]
    if missing:
        import_documents(missing)
        yield f"project demo: {len(missing)} annotated reports of demo instances imported"


def seed_demo():
    """Seed everything; yields one line per thing it did."""
    yield from _ensure_account()
    for project_index, (project, kind, patient_list) in enumerate(DEMO_CONTENT, start=1):
        yield from _ensure_archive(project, kind)
        archive = archive_by_name(project, DEMO_ARCHIVE)
        stored = 0
        for patient_number, patient in enumerate(patient_list, start=1):
            for sop_uid, data in demo_instances(project_index, patient_number, patient):
                store_bytes(archive, data, f"{sop_uid}.dcm")
                stored += 1
        yield f"project {project}: {stored} demo instances in archive {DEMO_ARCHIVE}"
    yield from _ensure_results()
    yield from _ensure_form()
    yield from _ensure_annotation_data()
