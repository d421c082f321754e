"""The descriptions at /openapi/v1.json and /openapi/annotations.json, the Swagger UI page that offers both
at /openapi/ (vendored in static/swagger-ui, loaded from the gateway alone), and the front page `/`."""
import functools

from flask import Blueprint, Response, jsonify, render_template, url_for

from . import annotations, v1

bp = Blueprint("openapi", __name__, static_folder="static/swagger-ui", static_url_path="/openapi/swagger-ui",
               template_folder="templates")

# The descriptions are made of the code alone: built once, at the first request for one.
_v1_description = functools.cache(v1.build)
_annotations_description = functools.cache(annotations.build)


@bp.get("/openapi/v1.json")
def v1_description():
    return jsonify(_v1_description())


@bp.get("/openapi/annotations.json")
def annotations_description():
    return jsonify(_annotations_description())


@bp.get("/openapi/")
def page():
    return render_template("openapi/page.html")


@bp.get("/openapi/initializer.js")
def initializer():
    descriptions = [
        {"name": v1.TITLE, "url": url_for(".v1_description")},
        {"name": annotations.TITLE, "url": url_for(".annotations_description")},
    ]
    return Response(render_template("openapi/initializer.js", descriptions=descriptions),
                    mimetype="text/javascript")


@bp.get("/")
def index():
    return render_template("openapi/front.html")
