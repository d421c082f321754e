"""Passwords: a slow KDF, verified once and then cached without ever accepting a wrong or old password."""
import time

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.security import generate_password_hash

import gateway.auth.credentials as credentials_module
from gateway import create_app
from gateway.auth.credentials import SCRYPT_COST, SCRYPT_COST_FOR_TESTS, CredentialCache, scrypt_method
from gateway.auth.users import create_user
from gateway.config import load_config
from gateway.db import db
from gateway.models import users
from tests.conftest import PASSWORD, credentials, release_connections

TEST_METHOD = scrypt_method(SCRYPT_COST_FOR_TESTS)  # what the tests' apps hash with (conftest.TEST_SETTINGS)


@pytest.fixture
def kdf_calls(monkeypatch):
    """(method, password) of each run of the KDF."""
    calls = []
    real = credentials_module.check_password_hash

    def counting(stored_hash, password):
        calls.append((stored_hash.split("$")[0], password))
        return real(stored_hash, password)

    monkeypatch.setattr(credentials_module, "check_password_hash", counting)
    return calls


def test_a_site_stores_passwords_with_werkzeugs_scrypt(app, kdf_calls):
    """The real KDF, which every other test replaces by a cheap one: werkzeug's scrypt at its own cost,
    for stored passwords and for the dummy that an unknown username is checked against."""
    assert SCRYPT_COST == 2**15 and generate_password_hash("x").startswith(f"{scrypt_method(SCRYPT_COST)}$")
    site = create_app({"DATABASE_URL": app.config["DATABASE_URL"], "STORAGE_DIR": app.config["STORAGE_DIR"]})
    with site.app_context():
        create_user("dora", "dora@example.org", PASSWORD)
        stored = db.session.execute(select(users.c.password_hash).where(users.c.username == "dora")).scalar()
    assert stored.startswith("scrypt:32768:8:1$") and PASSWORD not in stored
    client = site.test_client()
    assert client.get("/api/v1/patient/get/", headers=credentials("dora")).status_code == 403
    assert client.get("/api/v1/patient/get/", headers=credentials("mallory")).status_code == 401
    assert kdf_calls == [("scrypt:32768:8:1", PASSWORD)] * 2
    release_connections(site)


@pytest.mark.parametrize("cost, refused", [
    (2**15, False), (2**14, True), (2**20, False), (2**21, True), (3 * 2**14, True),
])
def test_a_site_may_raise_the_scrypt_cost_but_never_lower_it(monkeypatch, cost, refused):
    monkeypatch.setenv("GATEWAY_PASSWORD_SCRYPT_COST", str(cost))
    app = Flask(__name__)
    if refused:
        with pytest.raises(ValueError, match=f"^GATEWAY_PASSWORD_SCRYPT_COST must be a power of two from 32768 "
                                             f"to 1048576, not {cost}$"):
            load_config(app, None)
    else:
        load_config(app, None)
        assert app.config["PASSWORD_SCRYPT_COST"] == cost


@pytest.mark.parametrize("cost, refused", [(2**7, False), (2**6, True)])
def test_only_a_test_configuration_may_hash_cheaply(cost, refused):
    app = Flask(__name__)
    if refused:
        with pytest.raises(ValueError, match=f"must be a power of two from 128 to 1048576, not {cost}$"):
            load_config(app, {"PASSWORD_SCRYPT_COST": cost})
    else:
        load_config(app, {"PASSWORD_SCRYPT_COST": cost})
        assert app.config["PASSWORD_SCRYPT_COST"] == cost


def test_the_kdf_runs_once_for_many_requests(api, kdf_calls):
    for _ in range(5):
        assert api.get("patient/get/", Project="alpha", Archive="main", PatientID="x").status_code == 404
    assert kdf_calls == [(TEST_METHOD, PASSWORD)]


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
    assert kdf_calls == [(TEST_METHOD, PASSWORD)]  # at the app's cost, as for a known user


def test_cached_entries_expire(kdf_calls):
    cache = CredentialCache(ttl_seconds=0.05, scrypt_cost=SCRYPT_COST_FOR_TESTS)
    stored = generate_password_hash("pw", TEST_METHOD)
    assert cache.verify(1, stored, "pw")
    assert cache.verify(1, stored, "pw")
    assert len(kdf_calls) == 1
    time.sleep(0.1)
    assert cache.verify(1, stored, "pw")
    assert len(kdf_calls) == 2


def test_a_changed_stored_hash_misses_the_cache():
    cache = CredentialCache(ttl_seconds=60, scrypt_cost=SCRYPT_COST_FOR_TESTS)
    old = generate_password_hash("old", TEST_METHOD)
    assert cache.verify(7, old, "old")
    new = generate_password_hash("new", TEST_METHOD)
    assert not cache.verify(7, new, "old")
    assert cache.verify(7, new, "new")
