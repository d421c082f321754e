"""`gateway demo`: the demo user, projects, archives and DICOM instances that the README's examples use.

Seeding is idempotent: what exists is left as it is, and the generated files are deterministic, so
storing them again is a no-op.
"""
from sqlalchemy import select

from . import archive as archive_store
from .auth.users import create_user, grant
from .db import db
from .models import archives, projects, users
from .projects import ArchiveRef, add_member, create_archive, create_project
from .synthetic import DEMO_UID_ROOT, SECONDARY_CAPTURE_STORAGE, make_instance

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


def _archive_ref(project, kind):
    archive_id = db.session.execute(
        select(archives.c.id)
        .join(projects, projects.c.id == archives.c.project_id)
        .where(projects.c.name == project, archives.c.name == DEMO_ARCHIVE)
    ).scalar_one()
    return ArchiveRef(id=archive_id, project_kind=kind, can_upload=True)


def store_bytes(archive, data, filename):
    """Store one file's bytes as if it had been uploaded."""
    files = archive_store.storage()
    handle = files.temp_file()
    try:
        handle.write(data)
        handle.flush()
        return archive_store.store_instance(archive, handle, len(data), filename)
    finally:
        handle.close()
        files.discard_temp(handle.name)


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
                    sop_class_uid=SECONDARY_CAPTURE_STORAGE if modality == "OP" else "1.2.840.10008.5.1.4.1.1.2",
                    patient_name=name,
                    patient_sex=sex,
                    patient_birth_date=birth_date,
                    study_date=study_date,
                    study_description="Demo study",
                    series_description=description,
                    instance_number=instance_number,
                    pixel_seed=instance_number,
                )


def seed_demo():
    """Seed everything; yields one line per thing it did."""
    yield from _ensure_account()
    for project_index, (project, kind, patient_list) in enumerate(DEMO_CONTENT, start=1):
        yield from _ensure_archive(project, kind)
        archive = _archive_ref(project, kind)
        stored = 0
        for patient_number, patient in enumerate(patient_list, start=1):
            for sop_uid, data in demo_instances(project_index, patient_number, patient):
                store_bytes(archive, data, f"{sop_uid}.dcm")
                stored += 1
        yield f"project {project}: {stored} demo instances in archive {DEMO_ARCHIVE}"
