"""Password hashing and a short-lived cache of verified credentials.

A slow KDF (werkzeug's scrypt) makes stolen hashes expensive to attack, and would make every API
call cost tens of milliseconds; so once a password is verified, a keyed digest of it is cached under
the user's id and *stored hash*. A changed password changes the stored hash, so the old password can
never be accepted from the cache.
"""
import hashlib
import hmac
import secrets
import threading

from cachetools import TTLCache
from werkzeug.security import check_password_hash, generate_password_hash

# Checked against when the username is unknown, so that answering takes as long as for a real user.
_DUMMY_HASH = generate_password_hash(secrets.token_hex(16))


def hash_password(password):
    return generate_password_hash(password)


class CredentialCache:
    def __init__(self, ttl_seconds, max_entries=4096):
        self._key = secrets.token_bytes(32)  # per process: cached digests are useless outside it
        self._entries = TTLCache(maxsize=max_entries, ttl=ttl_seconds)
        self._lock = threading.Lock()

    def _digest(self, password):
        return hmac.new(self._key, password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def verify(self, user_id, stored_hash, password):
        """True when `password` matches `stored_hash`; a user_id of None checks against a dummy hash."""
        if user_id is None:
            check_password_hash(_DUMMY_HASH, password)
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
