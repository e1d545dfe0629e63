"""Failures a pipeline step raises; the shared consumer loop decides what happens next."""

from __future__ import annotations


class StepError(Exception):
    """Base class for failures raised by a stage step."""

    failure_class: str = "Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientError(StepError):
    """Worth retrying later (timeouts, 5xx, store unavailable): nothing is committed."""

    failure_class = "Transient"

    def __init__(self, message: str, failure_class: str = "Transient",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.failure_class = failure_class
        #: The least wait before the next try the other side asked for (an HTTP Retry-After).
        self.retry_after = retry_after


class PermanentError(StepError):
    """Retrying cannot help until something changes: the call is marked failed."""

    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(message)
        self.failure_class = failure_class


class Deferred(TransientError):
    """Not tried at all: a shared resource is busy (a recording host at its concurrency cap).

    The consumer loop sends the event back to the first retry tier *without* using up one
    of the call's attempts, so a busy (but healthy) host delays its calls and fails none.
    """

    def __init__(self, message: str, failure_class: str = "Deferred") -> None:
        super().__init__(message, failure_class)


class Refused(Deferred):
    """Not tried: the resource is believed down (a recording host's circuit is open).

    Like a deferral it uses up no attempt, so a call is not failed for tries it never had;
    unlike one it is bounded: once the call's retry deadline has passed
    (:func:`callingest.retry_tiers.past_deadline`) the consumer loop fails the call with
    this error's class and message. ``retry_after``: when trying again is worth it (the
    rest of the host's cool-down), which picks the retry tier.
    """

    def __init__(self, message: str, failure_class: str = "Refused",
                 retry_after: float | None = None) -> None:
        super().__init__(message, failure_class)
        self.retry_after = retry_after
