"""Projects, their archives and their members."""
from dataclasses import dataclass

from sqlalchemy import delete, insert, select

from .auth.users import user_id_of
from .db import db, write_transaction
from .errors import ObjectNotFound
from .models import PROJECT_KINDS, archives, project_members, projects


@dataclass(frozen=True)
class ArchiveRef:
    id: int
    project_id: int
    project_kind: str
    can_upload: bool


def create_project(name, kind="cad4tb"):
    if kind not in PROJECT_KINDS:
        raise ValueError(f"a project's kind is one of {', '.join(PROJECT_KINDS)}")
    if not name:
        raise ValueError("a project needs a name")
    with write_transaction() as session:
        if session.execute(select(projects.c.id).where(projects.c.name == name)).first():
            raise ValueError(f"project {name!r} exists already")
        session.execute(insert(projects).values(name=name, kind=kind))


def project_id_of(session, name):
    project_id = session.execute(select(projects.c.id).where(projects.c.name == name)).scalar()
    if project_id is None:
        raise ValueError(f"no project {name!r}")
    return project_id


def create_archive(project_name, name):
    if not name:
        raise ValueError("an archive needs a name")
    with write_transaction() as session:
        project_id = project_id_of(session, project_name)
        taken = select(archives.c.id).where(archives.c.project_id == project_id, archives.c.name == name)
        if session.execute(taken).first():
            raise ValueError(f"archive {name!r} exists already in project {project_name!r}")
        session.execute(insert(archives).values(project_id=project_id, name=name))


def add_member(project_name, username, can_upload=False):
    with write_transaction() as session:
        project_id = project_id_of(session, project_name)
        user_id = user_id_of(session, username)
        session.execute(
            delete(project_members).where(
                project_members.c.project_id == project_id, project_members.c.user_id == user_id
            )
        )
        session.execute(insert(project_members).values(project_id=project_id, user_id=user_id, can_upload=can_upload))


def archive_ref(access, project_name, archive_name):
    """The archive an auth.users.authenticate() row reaches; a project the user is not a member of does
    not exist for them."""
    if access.can_upload is None:
        raise ObjectNotFound("project_not_found", f"project {project_name!r} not found")
    if access.archive_id is None:
        raise ObjectNotFound("archive_not_found", f"archive {archive_name!r} not found in project {project_name!r}")
    return ArchiveRef(
        id=access.archive_id, project_id=access.project_id, project_kind=access.project_kind,
        can_upload=access.can_upload,
    )


def archive_by_name(project_name, archive_name):
    """An archive as the admin command line addresses it (no user, so no membership); ValueError if absent."""
    row = db.session.execute(
        select(projects.c.id, projects.c.kind, archives.c.id.label("archive_id"))
        .join(archives, archives.c.project_id == projects.c.id)
        .where(projects.c.name == project_name, archives.c.name == archive_name)
    ).first()
    if row is None:
        raise ValueError(f"no archive {archive_name!r} in a project {project_name!r}")
    return ArchiveRef(id=row.archive_id, project_id=row.id, project_kind=row.kind, can_upload=True)
