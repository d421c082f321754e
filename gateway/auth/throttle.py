"""Slowing credential guessing down for every worker at once: failures are counted in the store.

A key (a client address, an account) that fails AUTH_FAILURE_LIMIT times within
AUTH_FAILURE_WINDOW_SECONDS of its first failure is refused with 429 and Retry-After until that window
ends; nothing waits in a worker. The failures before the limit are plain 401s, so a mistyped password
never locks anybody out, and a key that has no failures is never slowed down: guessing one account
does not refuse another user's right credentials.
"""
import datetime
import math

from flask import current_app
from sqlalchemy import bindparam, delete, func, select, tuple_

from ..db import DIALECT_INSERTS, db, utcnow, write_transaction
from ..errors import NotAuthenticated
from ..models import auth_failures

KEY_LENGTH = auth_failures.c.key.type.length


class TooManyFailures(NotAuthenticated):
    status = 429

    def __init__(self, retry_after_seconds):
        super().__init__(
            "too_many_failures", f"too many failed attempts from this client or for this account: try again in "
            f"{retry_after_seconds} s"
        )
        self.headers = {"Retry-After": str(retry_after_seconds)}


def _window():
    return datetime.timedelta(seconds=current_app.config["AUTH_FAILURE_WINDOW_SECONDS"])


def _stored_keys(keys):
    return [(scope, key[:KEY_LENGTH]) for scope, key in keys if key]


def blocked_since():
    """A column expression: when the window of the first key of blocked_since_parameters(keys) that
    reached the limit started, else NULL. A scalar subquery, so a caller can fold it into a query it
    makes anyway."""
    return (
        select(func.min(auth_failures.c.window_started_at))
        .where(
            tuple_(auth_failures.c.scope, auth_failures.c.key).in_(bindparam("throttle_keys", expanding=True)),
            auth_failures.c.failures >= bindparam("throttle_limit"),
            auth_failures.c.window_started_at > bindparam("throttle_window_start"),
        )
        .scalar_subquery()
    )


def blocked_since_parameters(keys):
    return {
        "throttle_keys": _stored_keys(keys) or [("", "")],
        "throttle_limit": current_app.config["AUTH_FAILURE_LIMIT"],
        "throttle_window_start": utcnow() - _window(),
    }


def refuse_if_blocked(window_started_at):
    """Raise TooManyFailures when `window_started_at` (what blocked_since() found) is set."""
    if window_started_at is not None:
        remaining = window_started_at + _window() - utcnow()
        raise TooManyFailures(max(1, math.ceil(remaining.total_seconds())))


def check(keys):
    """Raise TooManyFailures when any of `keys` is blocked (a query of its own)."""
    refuse_if_blocked(db.session.execute(select(blocked_since()), blocked_since_parameters(keys)).scalar())


def record_failure(keys):
    """Count a failure for each of `keys`. Windows that ended are removed first, so a key that failed
    before starts a new window, and the table holds only the keys that failed lately."""
    now = utcnow()
    upsert = DIALECT_INSERTS[db.engine.dialect.name](auth_failures)
    upsert = upsert.on_conflict_do_update(
        index_elements=[auth_failures.c.scope, auth_failures.c.key], set_={"failures": auth_failures.c.failures + 1}
    )
    with write_transaction() as session:
        session.execute(delete(auth_failures).where(auth_failures.c.window_started_at <= now - _window()))
        session.execute(upsert, [
            {"scope": scope, "key": key, "failures": 1, "window_started_at": now} for scope, key in _stored_keys(keys)
        ])
