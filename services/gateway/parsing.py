"""Pure parsers for the scalar fields of a call: start_time, phone numbers, signal values.

No I/O and no state: each function takes the raw JSON value (already decoded by
``json.loads``) and either returns the normalized value or raises
:class:`FieldError` whose message names what is wrong without repeating the
field name (the caller prefixes it).
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import phonenumbers

EARLIEST_START_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)


class FieldError(ValueError):
    """A field's value cannot be accepted; ``str(exc)`` says why (never echoes secrets)."""


# --------------------------------------------------------------------------- start_time

_DATE = r"(?P<year>\d{4})(?P<sep>[-/])(?P<month>\d{2})(?P=sep)(?P<day>\d{2})"
_CLOCK = r":(?P<minute>\d{2}):(?P<second>\d{2})(?:\.(?P<fraction>\d{1,6}))?"
_TIME = r"(?P<hour>\d{2})" + _CLOCK
_OFFSET = r"(?P<zone>Z|(?P<sign>[+-])(?P<oh>\d{2})(?::?(?P<om>\d{2}))?)"

# ISO 8601 with an explicit zone: 2016/04/11T13:00:00.000-07:00, 2016-08-08 11:03:31 -0700.
_ISO_ZONED = re.compile(rf"{_DATE}[T ]{_TIME} ?{_OFFSET}", re.IGNORECASE | re.ASCII)
# Excel-compatible: 2016/04/11 13:00:00.000 PM, 2016-02-03 09:30:00 AM (network timezone).
_EXCEL = re.compile(rf"{_DATE} (?P<hour>\d{{1,2}}){_CLOCK} ?(?P<meridiem>AM|PM)",
                    re.IGNORECASE | re.ASCII)
# Zone-less: 2022-03-25 09:31:29 (network timezone).
_LOCAL = re.compile(rf"{_DATE}[T ]{_TIME}", re.IGNORECASE | re.ASCII)
# re.ASCII throughout: \d would otherwise match full-width and Arabic-Indic digits too.
_DIGITS = re.compile(r"\d+", re.ASCII)

_FORMAT_HINT = "is not a supported timestamp format"


def parse_start_time(value: Any, network_tz: tzinfo, *, now: datetime | None = None) -> datetime:
    """``value`` as an aware UTC datetime truncated to milliseconds.

    Accepted: epoch seconds (10 digits) or milliseconds (13 digits) as a JSON
    integer or string; compressed ``YYYYMMDDHHMMSSsss`` (17 digits, always UTC);
    ISO 8601 with ``-`` or ``/`` date separators, ``T`` or space, ``Z`` or a
    ``±hh[:]mm`` offset, optional fraction; Excel-compatible
    ``YYYY/MM/DD HH:MM:SS[.sss] AM|PM`` and zone-less ``YYYY-MM-DD HH:MM:SS``
    in ``network_tz``. An Excel hour of 13-23 is a 24-hour value and only
    goes with PM. Raises :class:`FieldError` for anything else, and for times
    before 2000-01-01 UTC or more than one day after ``now``.
    """
    parsed = _decode_start_time(value, network_tz)
    # The bounds first: comparing aware times cannot overflow, converting year 1 or 9999 to
    # UTC can.
    if parsed < EARLIEST_START_TIME:
        raise FieldError("must not be before 2000-01-01")
    if parsed > (now or datetime.now(UTC)) + MAX_FUTURE:
        raise FieldError("must not be more than a day in the future")
    parsed = parsed.astimezone(UTC)
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _decode_start_time(value: Any, network_tz: tzinfo) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FieldError(_FORMAT_HINT)
    text = str(value).strip()
    if _DIGITS.fullmatch(text):
        return _from_digits(text)
    if match := _ISO_ZONED.fullmatch(text):
        return _build(match, _offset(match))
    if match := _EXCEL.fullmatch(text):
        return _build(match, network_tz, hour=_excel_hour(match))
    if match := _LOCAL.fullmatch(text):
        return _build(match, network_tz)
    raise FieldError(_FORMAT_HINT)


def _from_digits(text: str) -> datetime:
    try:
        if len(text) == 10:
            return datetime.fromtimestamp(int(text), UTC)
        if len(text) == 13:
            return datetime.fromtimestamp(int(text) // 1000, UTC).replace(microsecond=int(text[-3:]) * 1000)
        if len(text) == 17:
            return datetime.strptime(text[:14], "%Y%m%d%H%M%S").replace(
                microsecond=int(text[14:]) * 1000, tzinfo=UTC
            )
    except (ValueError, OverflowError, OSError):
        raise FieldError(_FORMAT_HINT) from None
    raise FieldError(_FORMAT_HINT)


def _offset(match: re.Match[str]) -> tzinfo:
    if match["zone"].upper() == "Z":
        return UTC
    hours, minutes = int(match["oh"]), int(match["om"] or 0)
    if hours > 23 or minutes > 59:
        raise FieldError(_FORMAT_HINT)
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if match["sign"] == "-" else delta)


def _excel_hour(match: re.Match[str]) -> int:
    hour, pm = int(match["hour"]), match["meridiem"].upper() == "PM"
    if 1 <= hour <= 12:
        return (hour % 12) + (12 if pm else 0)
    if hour == 0 and not pm:
        return 0
    if 13 <= hour <= 23 and pm:
        return hour  # a 24-hour value with a redundant suffix, as the spec's own example
    raise FieldError(_FORMAT_HINT)


def _build(match: re.Match[str], tz: tzinfo, hour: int | None = None) -> datetime:
    fraction = match["fraction"] or ""
    try:
        return datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]) if hour is None else hour,
            int(match["minute"]),
            int(match["second"]),
            int(fraction.ljust(6, "0")) if fraction else 0,
            tzinfo=tz,
        )
    except ValueError:
        raise FieldError(_FORMAT_HINT) from None


# --------------------------------------------------------------------------- phone numbers

MAX_PHONE_INPUT_LENGTH = 32


def normalize_phone_number(value: Any) -> str:
    """``value`` in E.164 (``+18885551212``).

    Accepts a JSON integer or a string; without a leading ``+`` the number is
    read as a NANP number (10-digit national, or 11 digits starting with 1), or, when that
    is not a valid number and the digits begin with the country code of one of the other
    countries the spec names (:data:`COUNTRY_CODES_WITHOUT_PLUS`: the UK's 44, Spain's 34), as
    E.164 without its ``+`` (a JSON integer cannot carry one: ``442071838750``).
    Any country code is accepted after ``+``. Raises :class:`FieldError`
    unless phonenumbers considers the number valid.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FieldError("must be a phone number as a string or an integer")
    text = str(value).strip()
    if not text or len(text) > MAX_PHONE_INPUT_LENGTH:
        raise FieldError("is not a valid phone number")
    if text.startswith("-"):  # -2165388265: a negative number, not a phone number
        raise FieldError("must not be negative")
    return _normalize_phone_text(text)


#: The spec's countries besides the NANP ("UK and Spanish numbers are also supported"): their
#: numbers are also read from digits without the ``+`` when they are no valid NANP number.
COUNTRY_CODES_WITHOUT_PLUS = ("44", "34")


@functools.lru_cache(maxsize=65_536)
def _normalize_phone_text(text: str) -> str:
    """E.164 of a stripped, length-checked number (cached: the same numbers recur, e.g.
    an advertiser's tracking numbers; a FieldError is not cached)."""
    readings = [text]
    if text.isdigit() and text.startswith(COUNTRY_CODES_WITHOUT_PLUS):
        readings.append("+" + text)
    for reading in readings:
        try:
            number = phonenumbers.parse(reading, None if reading.startswith("+") else "US")
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    raise FieldError("is not a valid phone number")


# --------------------------------------------------------------------------- signal values

_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


def parse_signal_value(value: Any) -> bool:
    """A signal's value as a bool; ``None`` (not passed) means true.

    Accepts JSON true/false, the integers 1/0, and the strings true/false,
    yes/no, 1/0 in any case. Raises :class:`FieldError` otherwise.
    """
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        folded = value.strip().lower()
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
    raise FieldError("must be true/false, 1/0 or yes/no")
