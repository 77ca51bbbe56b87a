"""Typed errors, each with its HTTP status.

Routes and deployments raise these; each carries its HTTP status, and
`serve.http_errors` turns them into responses in each API's shape. (Serve's own overload
errors are translated into `Overloaded` by the router: Serve installs its own FastAPI
handlers for them, which would answer without Retry-After.) No web framework is imported
here, so model replicas can raise these without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class AtelierError(Exception):
    """Base of every error that reaches a client. `status` is its HTTP status."""

    status = 500
    kind = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def detail(self) -> Any:
        return self.message

    def __reduce__(self):
        # Errors cross processes (a model replica's reach the ingress): rebuilt from their
        # attributes, whatever their __init__ takes.
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[AtelierError], args: tuple, attributes: dict) -> AtelierError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(attributes)
    return error


@dataclass(frozen=True)
class Refused:
    """A client error (4xx) that a model replica answers with instead of raising it: Serve
    logs each raised exception as a failed request, with its traceback, and counts it among
    the deployment's errors. The router raises `error` in the ingress."""

    error: AtelierError


class InvalidField(AtelierError):
    """A request value is wrong; `loc` names it as (source, field, ...)."""

    status = 422
    kind = "invalid_request"

    def __init__(self, field: str, message: str, source: str = "body"):
        super().__init__(f"{field or source}: {message}")
        self.field, self.reason, self.source = field, message, source

    def at(self, source: str) -> InvalidField:
        """The same error located in another part of the request (query or body)."""
        return type(self)(self.field, self.reason, source)

    def detail(self) -> Any:
        loc = [self.source, self.field] if self.field else [self.source]
        return [{"loc": loc, "msg": self.reason, "type": "value_error"}]


class TooLarge(InvalidField):
    """A request value (an uploaded image) is over a size limit: 413, naming the field."""

    status = 413
    kind = "too_large"


class ContentFlagged(AtelierError):
    """The model's safety checker flagged every image of the request, and they were
    withheld. (Replicate's models fail such a prediction with this message.)"""

    status = 400
    kind = "content_policy_violation"

    def __init__(self):
        super().__init__("NSFW content detected. Try running it again, or try a different "
                         "prompt.")


class ModelNotFound(AtelierError):
    status = 404
    kind = "model_not_found"

    def __init__(self, model: str, known: list[str]):
        super().__init__(f"model {model!r} is not served here; served: {', '.join(known)}")


class Overloaded(AtelierError):
    """Every replica's queue is full: retry later."""

    status = 503
    kind = "overloaded"


class TimedOut(AtelierError):
    """The request ran past the model's request_timeout_s; its work was withdrawn."""

    status = 504
    kind = "timeout"


class ReplicaLost(AtelierError):
    """The replica running the request stopped (process crash, node loss): retry."""

    status = 503
    kind = "replica_lost"


class StoreUnavailable(AtelierError):
    """The store of predictions, files and rate limits (Redis) does not answer: retry."""

    status = 503
    kind = "store_unavailable"
    retry_after_s = 5


class OutOfMemory(AtelierError):
    """The device ran out of memory for this request even alone (its batch was split and
    retried smaller first): retry later, or ask for fewer images or a smaller size."""

    status = 503
    kind = "oom"


class InferenceFailed(AtelierError):
    """The pipeline failed on this request alone (its batchmates were retried without it)."""

    status = 500
    kind = "inference_failed"


class Unauthorized(AtelierError):
    status = 401
    kind = "unauthorized"


class RouteError(AtelierError):
    """What the web framework answers by itself (no such path, a method the path does not
    take), carried into the API's error shape; `status` is the framework's."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.kind = _ROUTE_KINDS.get(status, "invalid_request" if status < 500 else
                                     "internal_error")


_ROUTE_KINDS = {404: "not_found", 405: "method_not_allowed"}
