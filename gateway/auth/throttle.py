"""Slowing credential guessing down for every worker at once: failures are counted in the store.

A key (a client address, an account) that fails AUTH_FAILURE_LIMIT times within
AUTH_FAILURE_WINDOW_SECONDS of its first failure is refused with 429 and Retry-After until that window
ends; no worker sleeps on it. The failures before the limit are plain 401s, so a mistyped password
never locks anybody out, and a key that has no failures is never refused: guessing one account does
not refuse another user's right credentials from another address. (Clients behind one address share
its count: behind a proxy, GATEWAY_TRUSTED_PROXIES gives each client its own.) An IPv6 client is
counted by its /64, which one host may hold whole. The count is checked before a password is
verified and written after, so guesses in flight at once may pass the limit by as many.
"""
import datetime
import ipaddress
import math

from flask import current_app
from sqlalchemy import bindparam, delete, func, select, tuple_

from ..db import DIALECT_INSERTS, db, utcnow, write_transaction
from ..errors import NotAuthenticated
from ..models import auth_failures

KEY_LENGTH = auth_failures.c.key.type.length
ADDRESS_SCOPES = ("address", "passphrase")


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
    """(scope, key) as stored: an IPv6 address by its /64 (one host has all of them), an empty one (a
    unix socket without a trusted proxy) as "unknown", and no key longer than the column."""
    return [(scope, _client_key(key) if scope in ADDRESS_SCOPES else (key or "unknown")[:KEY_LENGTH])
            for scope, key in keys]


def _client_key(address):
    try:
        parsed = ipaddress.ip_address(address or "")
    except ValueError:
        return (address or "unknown")[:KEY_LENGTH]
    if parsed.version == 6:
        if parsed.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def blocked_since():
    """A column expression: when the latest window of the keys of blocked_since_parameters(keys) that
    reached the limit started (the last to end), else NULL. A scalar subquery, so a caller can fold it into a query it
    makes anyway."""
    return (
        select(func.max(auth_failures.c.window_started_at))
        .where(
            tuple_(auth_failures.c.scope, auth_failures.c.key).in_(bindparam("throttle_keys", expanding=True)),
            auth_failures.c.failures >= bindparam("throttle_limit"),
            auth_failures.c.window_started_at > bindparam("throttle_window_start"),
        )
        .scalar_subquery()
    )


def blocked_since_parameters(keys):
    return {
        "throttle_keys": _stored_keys(keys),
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
