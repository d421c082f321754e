"""gunicorn reads this file from its working directory: `gunicorn wsgi:app` run in the checkout takes the
settings that `gateway serve` runs with (gateway/server.py says why they are what they are)."""
from gateway.server import SETTINGS

globals().update(SETTINGS)
