"""The HTTP service: ``create_app(settings)`` builds a FastAPI app around one model artifact.

Routes: ``POST /score``, ``GET /healthz``, ``GET /readyz``, ``GET /metadata``, ``GET /metrics``,
``POST /admin/reload`` (off unless enabled), and FastAPI's ``/docs``. Every error is a JSON body
``{"error", "detail", "request_id"}`` with a 4xx status; an internal error is logged with its
request id and answered with a generic 500.

The package: ``factory`` (``create_app``, routes, dependencies, lifespan), ``score`` (the
``POST /score`` endpoint), ``parsing`` (request bodies to arrays), ``holder`` (the model and its
reload), ``middleware`` (body limit, observability) and ``asgi`` (shared plumbing).
"""

from serving.app.factory import create_app, create_app_from_env
from serving.app.parsing import parse_instances

__all__ = ["create_app", "create_app_from_env", "parse_instances"]
