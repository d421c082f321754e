"""Passwords: a slow KDF, verified once and then cached without ever accepting a wrong or old password."""
import time

import pytest
from sqlalchemy import select

import gateway.auth.credentials as credentials_module
from gateway.auth.credentials import CredentialCache
from gateway.db import db
from gateway.models import users
from tests.conftest import PASSWORD, credentials


@pytest.fixture
def kdf_calls(monkeypatch):
    calls = []
    real = credentials_module.check_password_hash

    def counting(stored_hash, password):
        calls.append(password)
        return real(stored_hash, password)

    monkeypatch.setattr(credentials_module, "check_password_hash", counting)
    return calls


def test_passwords_are_stored_with_scrypt(seeded):
    with seeded.app_context():
        stored = db.session.execute(select(users.c.password_hash).where(users.c.username == "alice")).scalar()
    assert stored.startswith("scrypt:") and PASSWORD not in stored


def test_the_kdf_runs_once_for_many_requests(api, kdf_calls):
    for _ in range(5):
        assert api.get("patient/get/", Project="alpha", Archive="main", PatientID="x").status_code == 404
    assert kdf_calls == [PASSWORD]


def test_a_wrong_password_is_never_accepted_from_the_cache(api, kdf_calls):
    assert api.get("patient/get/").status_code == 400
    wrong = api.get("patient/get/", headers=credentials("alice", PASSWORD + "x"))
    assert wrong.status_code == 401
    assert wrong.json == {"error_type": "not_authenticated", "suberror_type": None,
                          "message": "wrong username or password"}
    assert api.get("patient/get/", headers=credentials("alice", PASSWORD[:-1])).status_code == 401
    assert len(kdf_calls) == 3


def test_unknown_users_cost_a_kdf_run_too(api, kdf_calls):
    assert api.get("patient/get/", headers=credentials("mallory")).status_code == 401
    assert len(kdf_calls) == 1


def test_cached_entries_expire(kdf_calls):
    cache = CredentialCache(ttl_seconds=0.05)
    stored = credentials_module.hash_password("pw")
    assert cache.verify(1, stored, "pw")
    assert cache.verify(1, stored, "pw")
    assert len(kdf_calls) == 1
    time.sleep(0.1)
    assert cache.verify(1, stored, "pw")
    assert len(kdf_calls) == 2


def test_a_changed_stored_hash_misses_the_cache():
    cache = CredentialCache(ttl_seconds=60)
    old = credentials_module.hash_password("old")
    assert cache.verify(7, old, "old")
    new = credentials_module.hash_password("new")
    assert not cache.verify(7, new, "old")
    assert cache.verify(7, new, "new")
