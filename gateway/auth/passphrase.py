"""The annotation API's passphrase: clients send the sha256 hex digest of GATEWAY_PASSPHRASE.

Wrong passphrases are slowed down per client address: each one waits STEP_SECONDS for every failure
that client made without a whole quiet minute in between (at most MAX_DELAY_SECONDS). A mistyped phrase
costs a researcher a fraction of a second and never locks them out; a guessing loop gets slower and
slower. The right passphrase is never delayed. The counts live in each worker process, bounded.
"""
import hashlib
import hmac
import threading
import time

from cachetools import TTLCache

STEP_SECONDS = 0.1
MAX_DELAY_SECONDS = 5.0
QUIET_SECONDS = 60
MAX_CLIENTS = 10_000


class Passphrase:
    def __init__(self, passphrase):
        self._digest = hashlib.sha256(passphrase.encode("utf-8")).hexdigest().encode() if passphrase else None
        # An entry's time to live restarts with each failure, so a steady stream keeps its count.
        self._failures = TTLCache(maxsize=MAX_CLIENTS, ttl=QUIET_SECONDS)
        self._lock = threading.Lock()

    @property
    def required(self):
        return self._digest is not None

    def accepts(self, client_address, digest):
        """True when no passphrase is set or `digest` is its sha256 hex digest (any case).

        A missing digest is refused at once; a wrong one (or a JSON value that is no string) after the
        client's delay.
        """
        if self._digest is None:
            return True
        if digest is None or digest == "":
            return False
        if isinstance(digest, str) and hmac.compare_digest(
            digest.strip().lower().encode("utf-8", "surrogateescape"), self._digest
        ):
            return True
        time.sleep(self._failure_delay(client_address))
        return False

    def _failure_delay(self, client_address):
        with self._lock:
            failures = self._failures.get(client_address, 0) + 1
            self._failures[client_address] = failures
        return min(STEP_SECONDS * failures, MAX_DELAY_SECONDS)
