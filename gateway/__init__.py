"""The imaging research gateway: archive API v1 and annotation API over one SQL store."""
import os

from flask import Flask

from .auth import CredentialCache
from .auth.passphrase import Passphrase
from .config import load_config
from .db import configure_engine, db
from .storage import FileStorage
from .uploads import GatewayRequest, discard_unused_uploads


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.request_class = GatewayRequest
    load_config(app, test_config)
    os.makedirs(app.instance_path, exist_ok=True)

    db.init_app(app)
    with app.app_context():
        configure_engine(db.engine)
    app.extensions["gateway.storage"] = FileStorage(app.config["STORAGE_DIR"])
    app.extensions["gateway.credentials"] = CredentialCache(app.config["CREDENTIAL_CACHE_SECONDS"])
    app.extensions["gateway.passphrase"] = Passphrase(app.config["PASSPHRASE"])

    app.teardown_request(discard_unused_uploads)

    from . import v1
    from .annotations import api as annotation_api

    app.register_blueprint(v1.bp)
    v1.register_error_handlers(app)
    app.register_blueprint(annotation_api.bp)

    from .cli import register_commands

    register_commands(app)
    return app
