"""API errors: each maps to one HTTP status and the spec's errors body.

Views and the submission service raise these; one middleware turns them into
``{"errors": {"class": ..., "invalid_data": ...}}`` answers. Messages never
contain tokens or recording URL query strings.
"""

from __future__ import annotations

from callingest.rules import CAMPAIGN_CLASS, RECORD_INVALID_CLASS, record_invalid


class ApiError(Exception):
    """An answer other than success, with the spec's error class and message."""

    status: int = 400
    error_class: str = "BadRequest"

    def __init__(
        self, invalid_data: str, *, error_class: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(invalid_data)
        self.invalid_data = invalid_data
        if error_class is not None:
            self.error_class = error_class
        if status is not None:
            self.status = status

    def body(self) -> dict[str, dict[str, str]]:
        """The spec's error body."""
        return {"errors": {"class": self.error_class, "invalid_data": self.invalid_data}}


class InvalidApiVersion(ApiError):
    """400: a route of another API version."""

    status = 400
    error_class = "InvalidApiVersion"


class NotAuthorized(ApiError):
    """401: missing or unknown oauth token."""

    status = 401
    error_class = "NotAuthorized"


class Forbidden(ApiError):
    """403 with a class of its own (permission and campaign configuration errors)."""

    status = 403


class UnauthorizedOperation(Forbidden):
    """403: the token's network does not have the Call Ingestion API enabled."""

    error_class = "UnauthorizedOperation"

    def __init__(self) -> None:
        super().__init__("You do not have permissions to perform the requested operation.")


class UnauthorizedAdvertiser(Forbidden):
    """403: an advertiser-scoped token used with another advertiser's campaign."""

    error_class = "UnauthorizedAdvertiser"

    def __init__(self) -> None:
        super().__init__("You do not have access to this advertiser")


class CampaignError(Forbidden):
    """403 under ``call.advertiser_campaign_id_from_network``."""

    error_class = CAMPAIGN_CLASS


class RecordInvalid(Forbidden):
    """403: every problem of a request in one ``Validation failed: ...`` message."""

    error_class = RECORD_INVALID_CLASS

    def __init__(self, problems: list[str]) -> None:
        super().__init__(record_invalid(problems))
        self.problems = problems


class NotFound(ApiError):
    """404: no such call for this token, or no such route."""

    status = 404
    error_class = "NotFound"


class MethodNotAllowed(ApiError):
    """405: the route exists with other methods."""

    status = 405
    error_class = "MethodNotAllowed"


class Conflict(ApiError):
    """409: the external_call_unique_id was already used with other content, or a retry of a
    call that is not failed."""

    status = 409
    error_class = "Conflict"
    USED = "The external_call_unique_id in the request has already been used for a different call"

    def __init__(self, invalid_data: str | None = None) -> None:
        super().__init__(invalid_data or f"{self.USED}.")

    @classmethod
    def not_correctable(cls, cuid: str, status: str) -> Conflict:
        """Other content for a call processed again (after a retry or correction) that is not
        failed (again), said to a token that may see the call: why it is no correction."""
        if status == "normalized":
            return cls(f"{cls.USED}: the call {cuid} was processed again and is normalized; only "
                       "a failed call can be corrected.")
        return cls(f"{cls.USED}: the call {cuid} is already being processed again (it is {status}), "
                   "and only a failed call can be corrected; resubmit the correction if it fails again.")

    @classmethod
    def restarted_first(cls, cuid: str | None = None) -> Conflict:
        """A correction (``cuid`` given) or retry of a failed call that another correction or
        retry restarted first."""
        done = "is already being processed again: another retry or correction of it was accepted first."
        return cls(f"{cls.USED}: the call {cuid} {done}" if cuid else f"The call {done}")


class PayloadTooLarge(ApiError):
    """413: body over the limit."""

    status = 413
    error_class = "PayloadTooLarge"


class UnsupportedMediaType(ApiError):
    """415: the body is not application/json."""

    status = 415
    error_class = "UnsupportedMediaType"


class TooManyRequests(ApiError):
    """429: too many failed tokens from this address; retry after ``retry_after`` seconds."""

    status = 429
    error_class = "TooManyRequests"

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many requests with an invalid oauth token from this address; "
                         f"retry after {retry_after} seconds.")
        self.retry_after = retry_after


class ServiceUnavailable(ApiError):
    """503: Kafka or MongoDB cannot take the call now; retry after ``retry_after`` seconds."""

    status = 503
    error_class = "ServiceUnavailable"

    def __init__(self, invalid_data: str, retry_after: int = 5) -> None:
        super().__init__(invalid_data)
        self.retry_after = retry_after
