"""What the HTTP API answers when it cannot serve a request.

One body for every refusal, as FastAPI gives a validation failure: `{"detail": [{"loc": [...],
"msg": ..., "type": ...}]}`, `loc` naming the field. A model replica never raises at its caller:
it answers `{"error": Refused.to_dict()}`, so one bad member of a batch fails alone and the
replica stays up. Only a device fault (a CUDA error, not a request's arguments) marks a replica
broken for Serve to replace.
"""

from __future__ import annotations

from pydantic import BaseModel

DEVICE_FAULTS = ("CUDA error", "device-side assert", "illegal memory access", "cuDNN error", "NCCL error",
                 "CUBLAS_STATUS")  # fmt: skip


class Refused(Exception):
    """A request the API does not serve: the HTTP status, the body field at fault (None: the
    request as a whole), the reason, and for 503 how many seconds to wait."""

    def __init__(self, status: int, field: str | None, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.retry_after = status, field, message, retry_after

    def to_dict(self) -> dict:
        return {"status": self.status, "field": self.field, "message": self.message, "retry_after": self.retry_after}

    @classmethod
    def from_dict(cls, d: dict) -> "Refused":
        return cls(d["status"], d["field"], d["message"], d.get("retry_after"))

    def body(self) -> dict:
        return problem(self.field, self.message, "too_large" if self.status == 413 else "value_error")


def problem(field: str | None, message: str, kind: str = "value_error", where: str = "body") -> dict:
    return {"detail": [{"loc": [where, field] if field else [where], "msg": message, "type": kind}]}


def classify(err: Exception, field: str | None = None) -> Refused | None:
    """A replica's failure on one request, as the answer to give; None for a device fault."""
    import torch

    from diffplat.serving.adapters import UnknownAdapter

    if isinstance(err, Refused):
        return err
    if isinstance(err, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Refused(503, None, "out of memory for this request: retry, or ask for fewer or smaller images",
                       retry_after=5)  # fmt: skip
    if isinstance(err, UnknownAdapter):
        return Refused(422, "adapter", str(err))
    text = f"{type(err).__name__}: {err}"
    if type(err).__name__ == "AcceleratorError" or any(s in text for s in DEVICE_FAULTS):
        return None
    # The pipeline refused the arguments (diffusers checks them with ValueError) or failed on
    # them: the request's fault, not the replica's, which served others before and will again.
    return Refused(422, field, f"the model could not run this request: {text[:500]}")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """Every refusal's body: what is wrong, and where (`loc`: "body" and the field)."""

    detail: list[FieldError]


_MEANING = {
    400: "the request cannot be read",
    401: "missing or wrong API key (Authorization: Bearer <key>)",
    413: "the body or an uploaded image is larger than the server's limit",
    415: "the uploaded image is not PNG, JPEG or WebP",
    422: "a field is invalid or over a limit of this server; `loc` names it",
    503: "busy, out of memory, or a replica being replaced: retry after Retry-After seconds",
}


def answers(*statuses: int) -> dict:
    """OpenAPI `responses` for the refusals a route can give."""
    return {s: {"model": Problem, "description": _MEANING[s]} for s in statuses}
