"""OpenAPI 3.1 descriptions of both APIs, built from the code's own marshmallow schemas and call declarations
(apispec and its marshmallow plugin), and the pages that serve them (gateway.openapi.views)."""
