"""The imaging research gateway: archive API v1 and annotation API over one SQL store."""
import os

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from .annotations.transactions import SearchLog
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
    app.extensions["gateway.credentials"] = CredentialCache(app.config["CREDENTIAL_CACHE_SECONDS"],
                                                            app.config["PASSWORD_SCRYPT_COST"])
    app.extensions["gateway.passphrase"] = Passphrase(app.config["PASSPHRASE"])
    app.extensions["gateway.search_log"] = SearchLog(app)

    app.teardown_request(discard_unused_uploads)
    if app.config["TRUSTED_PROXIES"]:
        # the client address (throttling, the search record) from the proxies' X-Forwarded-For, and
        # only then: a client could write that header itself
        proxies = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)

    from . import v1
    from .annotations import api as annotation_api, vis
    from .openapi import views as openapi_views

    app.register_blueprint(v1.bp)
    v1.register_error_handlers(app)
    app.register_blueprint(annotation_api.bp)
    app.register_blueprint(vis.bp)
    app.register_blueprint(openapi_views.bp)

    from .cli import register_commands

    register_commands(app)
    return app
