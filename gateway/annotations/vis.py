"""`/vis/`: the static folder that GATEWAY_VIS_DIR names, where a site drops in the web page its users of
the existing annotation service already have (the SMI vis page), served as that service served it:
`/vis/` is the folder's index.html, `/vis/PATH` its file PATH. Unset, everything under /vis/ is a 404.

The page needs no passphrase: it is static, and the API calls it makes carry the passphrase.
"""
from flask import Blueprint, current_app, request, send_from_directory
from werkzeug.exceptions import MethodNotAllowed, NotFound

from .api import error_answer

bp = Blueprint("vis", __name__, url_prefix="/vis")


@bp.get("/")
def index():
    return page("index.html")


@bp.get("/<path:path>")
def page(path):
    folder = current_app.config["VIS_DIR"]
    if folder is None:
        return error_answer(404, "this gateway serves no page under /vis/ (GATEWAY_VIS_DIR is not set)")
    try:
        return send_from_directory(folder, path)
    except NotFound:  # a path that would leave the folder is not found either
        return error_answer(404, f"there is no file /vis/{path}")


@bp.before_app_request
def _wrong_method():
    """A method that /vis/ does not take fails in routing, before any handler of this blueprint would
    see it: it is answered here, in JSON as the rest."""
    if isinstance(request.routing_exception, MethodNotAllowed) and request.path.startswith(bp.url_prefix + "/"):
        return error_answer(405, f"/vis/ does not accept the {request.method} method")
    return None
