"""Configuration: defaults, then GATEWAY_* environment variables (or a test's mapping)."""
import os

from .db import engine_options

DEFAULTS = {
    "DATABASE_URL": None,  # default: SQLite file in the instance folder
    "STORAGE_DIR": None,  # default: instance/storage
    "PASSPHRASE": None,  # annotation API passphrase; unset = none needed
    "MAPPINGS_DIR": None,
    "MAX_UPLOAD_MB": 512,
    "CREDENTIAL_CACHE_SECONDS": 300,
    "AUTH_FAILURE_LIMIT": 10,
    "AUTH_FAILURE_WINDOW_SECONDS": 600,
    "SEARCH_SECONDS": 10,  # the database time a search may take per batch of results before a 503
    "TRUSTED_PROXIES": 0,  # how many proxies in front set X-Forwarded-For / -Proto; 0: trust no header
}
_NUMBERS = ("MAX_UPLOAD_MB", "CREDENTIAL_CACHE_SECONDS", "AUTH_FAILURE_WINDOW_SECONDS", "SEARCH_SECONDS")
_WHOLE_NUMBERS = ("AUTH_FAILURE_LIMIT", "TRUSTED_PROXIES")


def load_config(app, test_config):
    app.config.from_mapping(DEFAULTS)
    if test_config is None:
        app.config.from_prefixed_env("GATEWAY", loads=str)
    else:
        app.config.from_mapping(test_config)
    config = app.config
    config["DATABASE_URL"] = config["DATABASE_URL"] or "sqlite:///" + os.path.join(app.instance_path, "gateway.sqlite")
    config["STORAGE_DIR"] = config["STORAGE_DIR"] or os.path.join(app.instance_path, "storage")
    for name, kind in [(name, float) for name in _NUMBERS] + [(name, int) for name in _WHOLE_NUMBERS]:
        try:
            config[name] = kind(config[name])
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"GATEWAY_{name} must be {what}, not {config[name]!r}") from None
        if not 0 <= config[name] < float("inf"):  # nan fails this too
            raise ValueError(f"GATEWAY_{name} must be a finite number, not negative")
    config["MAX_CONTENT_LENGTH"] = int(config["MAX_UPLOAD_MB"] * 1024 * 1024)
    config["SQLALCHEMY_DATABASE_URI"] = config["DATABASE_URL"]
    config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", engine_options(config["DATABASE_URL"]))
