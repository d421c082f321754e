"""Password hashing and a short-lived cache of verified credentials.

A slow KDF (werkzeug's scrypt) makes stolen hashes expensive to attack, and would make every API
call cost tens of milliseconds; so once a password is verified, a keyed digest of it is cached under
the user's id and *stored hash*. A changed password changes the stored hash, so the old password can
never be accepted from the cache.
"""
import functools
import hashlib
import hmac
import secrets
import threading

from cachetools import TTLCache
from flask import current_app
from werkzeug.security import check_password_hash, generate_password_hash

# scrypt's cost N for new hashes (GATEWAY_PASSWORD_SCRYPT_COST), with r=8 and p=1: a power of two. The
# default is werkzeug's: ~50 ms and 32 MiB a hash, and a site may only raise it. The highest keeps the
# memory werkzeug lets hashlib.scrypt use (132·N·r bytes) under the 2 GiB that it accepts; the lowest,
# for tests only, is the least for which that memory suffices.
SCRYPT_COST = 2**15
SCRYPT_COST_MAXIMUM = 2**20
SCRYPT_COST_FOR_TESTS = 2**7


def scrypt_method(cost):
    return f"scrypt:{cost}:8:1"


def hash_password(password):
    """A new stored hash of `password`, at the app's scrypt cost."""
    return generate_password_hash(password, method=scrypt_method(current_app.config["PASSWORD_SCRYPT_COST"]))


@functools.cache  # one per process and cost
def _dummy_hash(cost):
    return generate_password_hash(secrets.token_hex(16), method=scrypt_method(cost))


class CredentialCache:
    def __init__(self, ttl_seconds, scrypt_cost=SCRYPT_COST, max_entries=4096):
        self._key = secrets.token_bytes(32)  # per process: cached digests are useless outside it
        self._entries = TTLCache(maxsize=max_entries, ttl=ttl_seconds)
        self._lock = threading.Lock()
        # Checked against when the username is unknown, so that answering takes as long as for a real user.
        self._dummy_hash = _dummy_hash(scrypt_cost)

    def _digest(self, password):
        return hmac.new(self._key, password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def verify(self, user_id, stored_hash, password):
        """True when `password` matches `stored_hash`; a user_id of None checks against a dummy hash."""
        if user_id is None:
            check_password_hash(self._dummy_hash, password)
            return False
        cache_key = (user_id, stored_hash)
        digest = self._digest(password)
        with self._lock:
            cached = self._entries.get(cache_key)
        if cached is not None and hmac.compare_digest(cached, digest):
            return True
        if not check_password_hash(stored_hash, password):
            return False
        with self._lock:
            self._entries[cache_key] = digest
        return True
