"""Credential guessing: failures counted in the store for every worker, answered 429 with Retry-After
once a client address or an account has failed too often, never a worker that sleeps; other users'
right credentials keep answering at once. Runs on SQLite and on PostgreSQL."""
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from gateway import create_app
from gateway.db import db
from gateway.models import auth_failures

from .conftest import credentials

LIMIT = 4
PASSPHRASE = "open sesame"
DIGEST = hashlib.sha256(PASSPHRASE.encode()).hexdigest()
PATIENT_CALL = "patient/get/"
PATIENT = {"Project": "alpha", "Archive": "main", "PatientID": "NOBODY"}


@pytest.fixture
def limited(seeded):
    seeded.config.update(AUTH_FAILURE_LIMIT=LIMIT, AUTH_FAILURE_WINDOW_SECONDS=60)
    return seeded


def v1_get(app, address, username="alice", password="wrong password"):
    return app.test_client().get(f"/api/v1/{PATIENT_CALL}", query_string=PATIENT,
                                 headers=credentials(username, password), environ_base={"REMOTE_ADDR": address})


def failure_rows(app):
    with app.app_context():
        return {(row.scope, row.key): row.failures for row in db.session.execute(select(auth_failures))}


def test_v1_guessing_is_answered_429_after_the_limit_per_address(limited):
    for _attempt in range(LIMIT):
        assert v1_get(limited, "203.0.113.9").status_code == 401
    blocked = v1_get(limited, "203.0.113.9", password="correct horse battery staple")  # even the right one
    assert blocked.status_code == 429
    assert blocked.get_json()["error_type"] == "not_authenticated"
    assert blocked.get_json()["suberror_type"] == "too_many_failures"
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    # another user from another address is not slowed: their right credentials answer as ever
    assert v1_get(limited, "198.51.100.7", username="bob", password="correct horse battery staple").status_code == 404


def test_v1_guessing_one_account_from_many_addresses_blocks_that_account_only(limited):
    for attempt in range(LIMIT):
        assert v1_get(limited, f"203.0.113.{attempt}").status_code == 401
    assert v1_get(limited, "203.0.113.200").status_code == 429  # a fresh address: the account is blocked
    assert v1_get(limited, "198.51.100.7", username="bob", password="correct horse battery staple").status_code == 404
    assert failure_rows(limited)[("account", "alice")] == LIMIT


def test_unknown_usernames_are_counted_like_known_ones(limited):
    """Else an account's 429, or its missing one, would tell which usernames exist."""
    for attempt in range(LIMIT):
        assert v1_get(limited, f"203.0.113.{attempt}", username="nobody").status_code == 401
    assert v1_get(limited, "203.0.113.200", username="nobody").status_code == 429
    assert failure_rows(limited)[("account", "nobody")] == LIMIT


def test_an_ipv6_client_is_counted_by_its_64_and_an_unknown_address_still_counts(limited):
    for host in range(LIMIT):
        assert v1_get(limited, f"2001:db8:1:2::{host + 1:x}", username=f"user{host}").status_code == 401
    assert v1_get(limited, "2001:db8:1:2:ffff::1", username="someone").status_code == 429
    assert v1_get(limited, "2001:db8:1:3::1", username="someone").status_code == 401  # another /64
    assert v1_get(limited, "", username="anyone").status_code == 401  # a unix socket: no address, no 500
    assert failure_rows(limited)[("address", "2001:db8:1:2::/64")] == LIMIT
    assert failure_rows(limited)[("address", "unknown")] == 1


def test_a_window_that_ended_starts_again_and_its_row_goes(limited):
    limited.config["AUTH_FAILURE_WINDOW_SECONDS"] = 3
    for _attempt in range(LIMIT):
        v1_get(limited, "203.0.113.9")
    assert v1_get(limited, "203.0.113.9").status_code == 429
    time.sleep(3.1)
    assert v1_get(limited, "203.0.113.9", password="correct horse battery staple").status_code == 404
    assert v1_get(limited, "192.0.2.1").status_code == 401  # a failure clears the ended windows
    assert failure_rows(limited) == {("address", "192.0.2.1"): 1, ("account", "alice"): 1}


@pytest.fixture
def protected_api(seeded):
    """The annotation API with a passphrase, on the same store."""
    app = create_app({**seeded.config, "PASSPHRASE": PASSPHRASE, "AUTH_FAILURE_LIMIT": LIMIT,
                      "AUTH_FAILURE_WINDOW_SECONDS": 60})
    yield app
    with app.app_context():
        db.engine.dispose()


def test_passphrase_guessing_is_answered_429_after_the_limit(protected_api):
    client = protected_api.test_client()

    def call(digest, address="203.0.113.9", path="search_anns/C0000001"):
        return client.get(f"/api/{path}", query_string={"passphrase": digest}, environ_base={"REMOTE_ADDR": address})

    for attempt in range(LIMIT - 1):
        assert call("0" * 64).status_code == 401
    assert client.get("/api/check_phrase/" + "1" * 64, environ_base={"REMOTE_ADDR": "203.0.113.9"}).get_json() is False
    blocked = call(DIGEST)  # a guess made while blocked learns nothing, even a right one
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert blocked.get_json() == {"success": False, "message": blocked.get_json()["message"]}
    assert "too many failed attempts" in blocked.get_json()["message"]
    assert client.get("/api/check_phrase/" + DIGEST, environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 429
    jsonp = client.get("/api/docs", query_string={"passphrase": DIGEST, "callback": "cb"},
                       environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert jsonp.status_code == 200 and jsonp.get_data(as_text=True).startswith("cb(")  # a script tag sees no status
    assert call(DIGEST, address="198.51.100.7").status_code == 200  # another client is not slowed
    not_text = client.post("/api/search_anns/x", json={"terms": [{"q": "C0000001"}], "passphrase": "\ud800"},
                           environ_base={"REMOTE_ADDR": "198.51.100.8"})
    assert not_text.status_code == 401  # a lone surrogate is a wrong digest, not a 500


def test_no_passphrase_configured_counts_nothing(seeded):
    client = seeded.test_client()
    for _attempt in range(12):
        assert client.get("/api/docs", query_string={"passphrase": "0" * 64}).status_code == 200
    assert failure_rows(seeded) == {}


def test_the_client_address_comes_from_x_forwarded_for_only_when_a_proxy_is_trusted(seeded):
    seeded.config.update(AUTH_FAILURE_LIMIT=LIMIT)
    for attempt in range(LIMIT):
        spoofed = seeded.test_client().get(
            f"/api/v1/{PATIENT_CALL}", query_string=PATIENT, headers={**credentials("nobody", "x"),
                                                                      "X-Forwarded-For": f"192.0.2.{attempt}"})
        assert spoofed.status_code == 401
    assert failure_rows(seeded) == {("address", "127.0.0.1"): LIMIT, ("account", "nobody"): LIMIT}
    trusting = create_app({**seeded.config, "TRUSTED_PROXIES": 1})
    try:
        answer = trusting.test_client().get(f"/api/v1/{PATIENT_CALL}", query_string=PATIENT,
                                            headers={**credentials("stranger", "x"), "X-Forwarded-For": "192.0.2.77"})
        assert answer.status_code == 401
        assert failure_rows(trusting)[("address", "192.0.2.77")] == 1
        assert failure_rows(trusting)[("account", "stranger")] == 1
    finally:
        with trusting.app_context():
            db.engine.dispose()


def test_through_gateway_serve_guessing_is_throttled_while_others_answer_fast(seeded, gunicorn):
    """Several workers, one count: a guesser (many connections, both APIs) is refused with 429 while
    another user's right credentials keep answering in well under a second."""
    base_url, log_path = gunicorn(seeded, {"GATEWAY_AUTH_FAILURE_LIMIT": str(LIMIT), "GATEWAY_TRUSTED_PROXIES": "1",
                                           "GATEWAY_PASSPHRASE": PASSPHRASE}, via_cli=True)
    guesser = {"X-Forwarded-For": "203.0.113.9"}
    user = {"X-Forwarded-For": "198.51.100.7"}

    def guess(number):  # a new connection each time: the kernel spreads them over the workers
        if number % 2:
            return requests.get(f"{base_url}/api/v1/{PATIENT_CALL}", params=PATIENT, timeout=10,
                                headers={**credentials("alice", f"guess {number}"), **guesser}).status_code
        return requests.get(f"{base_url}/api/docs", params={"passphrase": f"{number:064x}"}, headers=guesser,
                            timeout=10).status_code

    def right_user():
        start = time.monotonic()
        status = requests.get(f"{base_url}/api/v1/{PATIENT_CALL}", params=PATIENT, timeout=10,
                              headers={**credentials("bob"), **user}).status_code
        return status, time.monotonic() - start

    with ThreadPoolExecutor(4) as pool:
        guesses = list(pool.map(guess, range(40)))
        answers = [right_user() for _ in range(10)]
    # LIMIT for v1 and LIMIT for the passphrase, counted across the workers (per worker it would be twice
    # as many), plus what four guesses in flight at once can slip past a count not yet written
    assert 2 * LIMIT <= guesses.count(401) <= 2 * LIMIT + 6, guesses
    assert guesses.count(429) == 40 - guesses.count(401), guesses
    assert all(status == 404 for status, _ in answers), answers  # bob is not a member of alpha: a 404, not a 429
    assert max(seconds for _, seconds in answers) < 0.5, answers
    with seeded.app_context():
        assert db.session.execute(select(func.count()).select_from(auth_failures)).scalar_one() == 3
