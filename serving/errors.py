"""HTTP errors of the service, and the one place that maps exceptions to status codes.

Every error response is JSON: ``{"error": <code>, "detail": <what is wrong>, "request_id": ...}``.
"""

from __future__ import annotations

from detector.errors import (
    ArtifactError,
    ConfigError,
    InputError,
    NotCalibratedError,
    VAEAnomalyError,
)


class ServingError(VAEAnomalyError):
    status_code = 400
    code = "bad_request"


class BadRequest(ServingError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ServingError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServingError):
    status_code = 403
    code = "forbidden"


class NotFound(ServingError):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(ServingError):
    status_code = 405
    code = "method_not_allowed"


class PayloadTooLarge(ServingError):
    status_code = 413
    code = "payload_too_large"


class InvalidParameter(ServingError):
    """A query parameter that is not valid (e.g. ``target_fpr=2``)."""

    status_code = 422
    code = "invalid_parameter"


class UnsupportedMediaType(ServingError):
    status_code = 415
    code = "unsupported_media_type"


class ModelNotReady(ServingError):
    status_code = 503
    code = "model_not_ready"


def status_for(exc: VAEAnomalyError) -> tuple[int, str]:
    """HTTP status and error code for an exception of the vae-anomaly tree."""
    if isinstance(exc, ServingError):
        return exc.status_code, exc.code
    if isinstance(exc, InputError):
        return 422, "invalid_input"
    if isinstance(exc, ConfigError):  # e.g. a target_fpr override out of range
        return 422, "invalid_parameter"
    if isinstance(exc, ArtifactError):
        return 409, "artifact_error"
    if isinstance(exc, NotCalibratedError):
        return 503, "model_not_ready"
    return 400, "bad_request"
