"""`gateway demo`: the demo user, projects, archives and DICOM instances that the README's examples use.

Seeding is idempotent: what exists is left as it is, and the generated files are deterministic, so
storing them again is a no-op.
"""
import io
import json
import struct
import zlib

from sqlalchemy import select

from . import archive as archive_store
from .auth.users import create_user, grant
from .db import db
from .forms import create_form
from .models import forms, projects, series_results, users
from .projects import add_member, archive_by_name, create_archive, create_project
from .results import add_result
from .synthetic import CT_IMAGE_STORAGE, DEMO_UID_ROOT, SECONDARY_CAPTURE_STORAGE, make_instance

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_ARCHIVE = "main"

# (project, kind, patients); a patient is (PatientID, name, sex, birth date, studies);
# a study is (number, date, series); a series is (number, modality, description, instance count).
DEMO_CONTENT = (
    (
        "demo",
        "cad4tb",
        (
            ("DEMO-001", "Doe^Jane", "F", "19700412", ((1, "20240102", ((1, "CR", "Chest PA", 1), (2, "CT", "Chest CT", 3))),)),
            ("DEMO-002", "Roe^Richard", "M", "19581130", ((1, "20240215", ((1, "CR", "Chest PA", 1),)),)),
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
                    sop_class_uid=SECONDARY_CAPTURE_STORAGE if modality == "OP" else CT_IMAGE_STORAGE,
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
