"""Archive users: creation, permissions, and the check that every v1 call makes."""

from flask import current_app, request
from sqlalchemy import and_, bindparam, delete, exists, insert, literal, select

from ..db import db, utcnow, write_transaction
from ..errors import NotAllowed, NotAuthenticated
from ..models import archives, project_members, projects, user_permissions, users
from . import throttle
from .credentials import hash_password
from .permissions import expand_permissions


def create_user(username, email, password):
    if not username or not password:
        raise ValueError("a user needs a username and a non-empty password")
    with write_transaction() as session:
        if session.execute(select(users.c.id).where(users.c.username == username)).first():
            raise ValueError(f"user {username!r} exists already")
        session.execute(
            insert(users).values(
                username=username,
                email=email,
                password_hash=hash_password(password),
                created_at=utcnow(),
            )
        )


def set_password(username, password):
    with write_transaction() as session:
        result = session.execute(
            users.update().where(users.c.username == username).values(password_hash=hash_password(password))
        )
        if result.rowcount != 1:
            raise ValueError(f"no user {username!r}")


def user_id_of(session, username):
    user_id = session.execute(select(users.c.id).where(users.c.username == username)).scalar()
    if user_id is None:
        raise ValueError(f"no user {username!r}")
    return user_id


def grant(username, names):
    permissions = expand_permissions(names)
    with write_transaction() as session:
        user_id = user_id_of(session, username)
        session.execute(
            delete(user_permissions).where(
                user_permissions.c.user_id == user_id, user_permissions.c.permission.in_(permissions)
            )
        )
        session.execute(insert(user_permissions), [{"user_id": user_id, "permission": p} for p in permissions])
    return permissions


# One round trip for everything a call checks before it looks at its object: whether the client or
# the account is throttled, the credentials, the permission, and the membership, kind and archive of
# the project it names. It answers one row even for an unknown username (the throttle's).
_ACCESS = (
    select(
        throttle.blocked_since().label("blocked_since"),
        users.c.id,
        users.c.password_hash,
        exists()
        .where(and_(user_permissions.c.user_id == users.c.id, user_permissions.c.permission == bindparam("permission")))
        .label("allowed"),
        projects.c.id.label("project_id"),
        projects.c.kind.label("project_kind"),
        project_members.c.can_upload,
        archives.c.id.label("archive_id"),
    )
    .select_from(select(literal(1).label("anchor")).subquery())
    .outerjoin(users, users.c.username == bindparam("username"))
    .outerjoin(projects, projects.c.name == bindparam("project"))
    .outerjoin(
        project_members, and_(project_members.c.project_id == projects.c.id, project_members.c.user_id == users.c.id)
    )
    .outerjoin(archives, and_(archives.c.project_id == projects.c.id, archives.c.name == bindparam("archive")))
)


def authenticate(username, password, permission, project=None, archive=None):
    """The user these credentials name, who must hold `permission`, with what they may reach of `project`.

    Raises NotAuthenticated (missing or wrong credentials; TooManyFailures, a 429, while the client
    address or the account has failed too often lately) before NotAllowed (missing permission).
    The row returned carries the user's `id` and the columns that projects.archive_ref() reads.
    """
    if not username or not password:
        raise NotAuthenticated(None, "X-USERNAME and X-PASSWORD headers are required")
    if "\x00" in username:  # no stored username holds a NUL, and PostgreSQL refuses to compare one
        username = ""
    throttle_keys = [("address", request.remote_addr), ("account", username)]
    row = (
        db.session.connection()
        .execute(_ACCESS, {
            "username": username, "permission": permission, "project": project, "archive": archive,
            **throttle.blocked_since_parameters(throttle_keys),
        })
        .one()
    )
    throttle.refuse_if_blocked(row.blocked_since)
    if not current_app.extensions["gateway.credentials"].verify(row.id, row.password_hash, password):
        # an unknown username is counted as an account too: else its missing 429 would tell it is unknown
        throttle.record_failure(throttle_keys)
        raise NotAuthenticated(None, "wrong username or password")
    if not row.allowed:
        raise NotAllowed(None, f"this call needs the permission {permission}")
    return row
