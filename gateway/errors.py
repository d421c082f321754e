"""Errors that the domain modules raise and both HTTP layers turn into their own error bodies."""


class GatewayError(Exception):
    status = 500
    error_type = "internal_error"
    headers = {}  # of the answer, e.g. Retry-After

    def __init__(self, suberror_type, message):
        super().__init__(message)
        self.suberror_type = suberror_type
        self.message = message


class NotAuthenticated(GatewayError):
    status = 401
    error_type = "not_authenticated"


class NotAllowed(GatewayError):
    status = 403
    error_type = "api_call_not_allowed"


class InvalidValue(GatewayError):
    """Bad input; the v1 layer names it invalid_post_value or invalid_get_value after the method."""

    status = 400
    error_type = "invalid_value"


class ObjectNotFound(GatewayError):
    status = 404
    error_type = "object_not_found"


class Conflict(GatewayError):
    """The input contradicts what is stored (e.g. another file under an existing SOPInstanceUID)."""

    status = 409
    error_type = "invalid_value"


class MultipleObjectsFound(GatewayError):
    status = 409
    error_type = "multiple_objects_found"


class SearchTooSlow(GatewayError):
    """The database worked on a search for longer than its time budget, and was stopped."""

    status = 503
    error_type = "search_too_slow"
