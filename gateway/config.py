"""Configuration: defaults, then GATEWAY_* environment variables (or a test's mapping)."""
import os

from .auth.credentials import SCRYPT_COST, SCRYPT_COST_FOR_TESTS, SCRYPT_COST_MAXIMUM
from .db import engine_options

DEFAULTS = {
    "DATABASE_URL": None,  # default: SQLite file in the instance folder
    "STORAGE_DIR": None,  # default: instance/storage
    "PASSPHRASE": None,  # annotation API passphrase; unset = none needed
    "MAPPINGS_DIR": None,
    "VIS_DIR": None,  # the static folder served at /vis/; unset = no /vis/
    "MAX_UPLOAD_MB": 512,
    "CREDENTIAL_CACHE_SECONDS": 300,
    "AUTH_FAILURE_LIMIT": 10,
    "AUTH_FAILURE_WINDOW_SECONDS": 600,
    "SEARCH_SECONDS": 10,  # the database time a search may take per batch of results before a 503
    "TRUSTED_PROXIES": 0,  # how many proxies in front set X-Forwarded-For / -Proto; 0: trust no header
    "PASSWORD_SCRYPT_COST": SCRYPT_COST,  # scrypt's N for new password hashes
}
_NUMBERS = ("MAX_UPLOAD_MB", "CREDENTIAL_CACHE_SECONDS", "AUTH_FAILURE_WINDOW_SECONDS", "SEARCH_SECONDS")
_WHOLE_NUMBERS = ("AUTH_FAILURE_LIMIT", "TRUSTED_PROXIES", "PASSWORD_SCRYPT_COST")


def load_config(app, test_config):
    app.config.from_mapping(DEFAULTS)
    if test_config is None:
        app.config.from_prefixed_env("GATEWAY", loads=str)
    else:
        app.config.from_mapping(test_config)
    config = app.config
    config["DATABASE_URL"] = config["DATABASE_URL"] or "sqlite:///" + os.path.join(app.instance_path, "gateway.sqlite")
    config["STORAGE_DIR"] = config["STORAGE_DIR"] or os.path.join(app.instance_path, "storage")
    # absolute, from where the gateway starts: Flask would take a relative folder from the package's
    config["VIS_DIR"] = os.path.abspath(config["VIS_DIR"]) if config["VIS_DIR"] else None
    if config["VIS_DIR"] and not os.path.isdir(config["VIS_DIR"]):
        raise ValueError(f"GATEWAY_VIS_DIR must name a folder; there is none at {config['VIS_DIR']}")
    for name, kind in [(name, float) for name in _NUMBERS] + [(name, int) for name in _WHOLE_NUMBERS]:
        try:
            config[name] = kind(config[name])
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"GATEWAY_{name} must be {what}, not {config[name]!r}") from None
        if not 0 <= config[name] < float("inf"):  # nan fails this too
            raise ValueError(f"GATEWAY_{name} must be a finite number, not negative")
    # Only a test's mapping may make password hashes cheap; a site may make them dearer.
    lowest_cost = SCRYPT_COST_FOR_TESTS if test_config is not None else SCRYPT_COST
    cost = config["PASSWORD_SCRYPT_COST"]
    if not lowest_cost <= cost <= SCRYPT_COST_MAXIMUM or cost & (cost - 1):
        raise ValueError(f"GATEWAY_PASSWORD_SCRYPT_COST must be a power of two from {lowest_cost} to "
                         f"{SCRYPT_COST_MAXIMUM}, not {cost}")
    config["MAX_CONTENT_LENGTH"] = int(config["MAX_UPLOAD_MB"] * 1024 * 1024)
    config["SQLALCHEMY_DATABASE_URI"] = config["DATABASE_URL"]
    config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", engine_options(config["DATABASE_URL"]))
