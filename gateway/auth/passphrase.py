"""The annotation API's passphrase: clients send the sha256 hex digest of GATEWAY_PASSPHRASE.

Wrong digests are counted per client address in the store (gateway.auth.throttle), so every worker
sees them: a client that keeps guessing is answered 429 with Retry-After, checked before its digest
is compared, so a guess made while blocked learns nothing. Without a passphrase nothing is counted.
"""
import hashlib
import hmac

from . import throttle


class Passphrase:
    def __init__(self, passphrase):
        self._digest = hashlib.sha256(passphrase.encode("utf-8")).hexdigest().encode() if passphrase else None

    @property
    def required(self):
        return self._digest is not None

    def accepts(self, client_address, digest):
        """True when no passphrase is set or `digest` is its sha256 hex digest (any case).

        A missing digest is refused without counting; a wrong one (or a JSON value that is no string)
        is counted against the client. Raises TooManyFailures while the client is blocked.
        """
        if self._digest is None:
            return True
        if digest is None or digest == "":
            return False
        keys = [("passphrase", client_address)]
        throttle.check(keys)
        if isinstance(digest, str) and hmac.compare_digest(
            digest.strip().lower().encode("utf-8", "replace"), self._digest
        ):
            return True
        throttle.record_failure(keys)
        return False
