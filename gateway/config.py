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
}


def load_config(app, test_config):
    app.config.from_mapping(DEFAULTS)
    if test_config is None:
        app.config.from_prefixed_env("GATEWAY", loads=str)
    else:
        app.config.from_mapping(test_config)
    config = app.config
    config["DATABASE_URL"] = config["DATABASE_URL"] or "sqlite:///" + os.path.join(app.instance_path, "gateway.sqlite")
    config["STORAGE_DIR"] = config["STORAGE_DIR"] or os.path.join(app.instance_path, "storage")
    try:
        max_upload_mb = float(config["MAX_UPLOAD_MB"])
        cache_seconds = float(config["CREDENTIAL_CACHE_SECONDS"])
    except ValueError as error:
        raise ValueError(f"GATEWAY_MAX_UPLOAD_MB and GATEWAY_CREDENTIAL_CACHE_SECONDS are numbers: {error}") from None
    config["MAX_UPLOAD_MB"] = max_upload_mb
    config["CREDENTIAL_CACHE_SECONDS"] = cache_seconds
    config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    config["SQLALCHEMY_DATABASE_URI"] = config["DATABASE_URL"]
    config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", engine_options(config["DATABASE_URL"]))
