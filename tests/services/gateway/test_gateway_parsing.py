"""The pure parsers: start_time, phone numbers, signal values (examples and properties)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from services.gateway.parsing import (
    FieldError,
    normalize_phone_number,
    parse_signal_value,
    parse_start_time,
)

LA = ZoneInfo("America/Los_Angeles")
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
APRIL_11_1PM_PACIFIC = datetime(2016, 4, 11, 20, 0, tzinfo=UTC)

# Every example of the spec's "Timestamp Formats" section, verbatim.
SPEC_TIMESTAMP_EXAMPLES = [
    1460404800,
    "1460404800",
    1460404800000,
    "1460404800000",
    "2016/04/11T23:00:00.000+03:00",
    "2016/04/11T13:00:00.000-07:00",
    "2016/04/11T20:00:00.000Z",
    "2016/04/11T13:00:00-07:00",
    "2016/04/11 13:00:00.000 PM",
    "2016/04/11 13:00:00 PM",
]


@pytest.mark.parametrize("value", SPEC_TIMESTAMP_EXAMPLES)
def test_spec_timestamp_examples_are_1pm_pacific(value: object) -> None:
    assert parse_start_time(value, LA, now=NOW) == APRIL_11_1PM_PACIFIC


def test_compressed_timestamp_is_always_utc() -> None:
    assert parse_start_time("20160411130000000", LA, now=NOW) == datetime(
        2016, 4, 11, 13, 0, tzinfo=UTC
    )
    assert parse_start_time(20160411130000123, LA, now=NOW) == datetime(
        2016, 4, 11, 13, 0, 0, 123000, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # The forms the spec's request examples use.
        ("2016-02-03 09:30:00 AM", datetime(2016, 2, 3, 17, 30, tzinfo=UTC)),
        ("2016-08-08 11:03:31 -0700", datetime(2016, 8, 8, 18, 3, 31, tzinfo=UTC)),
        ("2022-03-25 09:31:29", datetime(2022, 3, 25, 16, 31, 29, tzinfo=UTC)),
        # ISO 8601 variants.
        ("2016-04-11T13:00:00-07:00", APRIL_11_1PM_PACIFIC),
        ("2016-04-11T20:00:00Z", APRIL_11_1PM_PACIFIC),
        ("2016-04-11 20:00:00.000z", APRIL_11_1PM_PACIFIC),
        ("2016-04-11T13:00:00-0700", APRIL_11_1PM_PACIFIC),
        ("2016-04-11T15:00:00+02", datetime(2016, 4, 11, 13, 0, tzinfo=UTC)),
        ("2016/04/11T13:00:00.5-07:00", APRIL_11_1PM_PACIFIC.replace(microsecond=500000)),
        # Excel-compatible, 12-hour clock.
        ("2016/04/11 01:00:00 PM", APRIL_11_1PM_PACIFIC),
        ("2016/04/11 1:00:00 pm", APRIL_11_1PM_PACIFIC),
        ("2016/04/11 12:00:00 AM", datetime(2016, 4, 11, 7, 0, tzinfo=UTC)),
        ("2016/04/11 12:30:00 PM", datetime(2016, 4, 11, 19, 30, tzinfo=UTC)),
        ("2016/04/11 00:15:00 AM", datetime(2016, 4, 11, 7, 15, tzinfo=UTC)),
        ("2016/01/11 13:00:00PM", datetime(2016, 1, 11, 21, 0, tzinfo=UTC)),  # PST, not PDT
        ("  1460404800  ", APRIL_11_1PM_PACIFIC),
        # Milliseconds beyond ms are truncated.
        ("2016-04-11T20:00:00.123456Z", APRIL_11_1PM_PACIFIC.replace(microsecond=123000)),
        (1460404800123, APRIL_11_1PM_PACIFIC.replace(microsecond=123000)),
    ],
)
def test_accepted_forms(value: object, expected: datetime) -> None:
    assert parse_start_time(value, LA, now=NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        None,
        True,
        1460404800.5,
        [1460404800],
        "146040480",  # 9 digits
        "14604048000",  # 11 digits
        "146040480000000",
        "2016/04-11T13:00:00Z",  # mixed separators
        "2016-04-11T13:00Z",  # no seconds
        "2016-04-31T13:00:00Z",  # no such day
        "2016-04-11T24:00:00Z",
        "2016-04-11T13:00:00+24:00",
        "2016/04/11 13:00:00 AM",  # 24-hour value with the wrong suffix
        "2016/04/11 00:00:00 PM",
        "2016/04/11 13:00:00.000 XM",
        "20161311130000000",  # month 13
        "11/04/2016 13:00:00",
        "2016-04-11T13:00:00-07:00 extra",
    ],
)
def test_rejected_forms(value: object) -> None:
    with pytest.raises(FieldError):
        parse_start_time(value, LA, now=NOW)


def test_implausible_times_are_rejected() -> None:
    with pytest.raises(FieldError, match="2000"):
        parse_start_time("1999-12-31T23:59:59Z", LA, now=NOW)
    with pytest.raises(FieldError, match="future"):
        parse_start_time(int((NOW + timedelta(days=1, seconds=1)).timestamp()), LA, now=NOW)
    assert parse_start_time("2000-01-01T00:00:00Z", LA, now=NOW) == datetime(2000, 1, 1, tzinfo=UTC)
    ahead = NOW + timedelta(hours=23)
    assert parse_start_time(int(ahead.timestamp()), LA, now=NOW) == ahead


@pytest.mark.parametrize("value", [
    "9999/12/31T23:59:59.000-14:00", "9999-12-31 23:59:59", "9999/12/31 11:59:59 PM",
    "0001-01-01T00:00:00+01:00", "0001-01-01 00:00:00", "0001/01/01 12:00:00 AM",
])
def test_times_at_the_ends_of_the_calendar_are_rejected_not_overflowed(value: str) -> None:
    """Year 1 or 9999 in a zone: converting it to UTC leaves the calendar (OverflowError)."""
    with pytest.raises(FieldError, match=r"2000|future"):
        parse_start_time(value, LA, now=NOW)


@given(st.datetimes(timezones=st.just(UTC)), st.integers(-23 * 60 - 59, 23 * 60 + 59),
       st.sampled_from(["T", " "]))
def test_any_calendar_time_with_any_offset_parses_or_is_a_field_error(
        moment: datetime, offset: int, separator: str) -> None:
    sign, minutes = ("-" if offset < 0 else "+"), abs(offset)
    value = f"{moment:%Y-%m-%d}{separator}{moment:%H:%M:%S}{sign}{minutes // 60:02}:{minutes % 60:02}"
    try:
        parsed = parse_start_time(value, LA, now=NOW)
    except FieldError:
        return
    assert datetime(2000, 1, 1, tzinfo=UTC) <= parsed <= NOW + timedelta(days=1)


# Epoch seconds have 10 digits from 2001-09-09T01:46:40Z on.
moments = st.datetimes(
    min_value=datetime(2001, 9, 10), max_value=datetime(2026, 11, 26), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
zones = st.sampled_from(
    [ZoneInfo(n) for n in ("America/Los_Angeles", "UTC", "Europe/Madrid", "Asia/Kolkata")]
)


@given(moments, zones)
def test_every_form_round_trips(moment: datetime, tz: ZoneInfo) -> None:
    local = moment.astimezone(tz)
    assume(
        local.replace(tzinfo=None).replace(tzinfo=tz).astimezone(UTC) == moment
    )  # not in a DST fold
    ms = f"{moment.microsecond // 1000:03d}"
    hour12 = local.hour % 12 or 12
    epoch_ms = int(moment.replace(microsecond=0).timestamp()) * 1000 + moment.microsecond // 1000
    forms = [
        (epoch_ms, moment),
        (str(epoch_ms), moment),
        (int(moment.timestamp()), moment.replace(microsecond=0)),
        (moment.strftime("%Y%m%d%H%M%S") + ms, moment),
        (local.strftime("%Y/%m/%dT%H:%M:%S.") + ms + local.strftime("%z"), moment),
        (local.strftime("%Y-%m-%d %H:%M:%S.") + ms + " " + local.strftime("%z"), moment),
        (moment.strftime("%Y-%m-%dT%H:%M:%S.") + ms + "Z", moment),
        (local.strftime(f"%Y/%m/%d {hour12:02d}:%M:%S.") + ms + local.strftime(" %p"), moment),
        (local.strftime("%Y-%m-%d %H:%M:%S.") + ms, moment),
    ]
    for text, expected in forms:
        assert parse_start_time(text, tz, now=NOW) == expected, text


@given(st.integers(min_value=13, max_value=23), moments)
def test_excel_24_hour_value_with_pm_is_that_hour(hour: int, moment: datetime) -> None:
    day = moment.strftime("%Y/%m/%d")
    parsed = parse_start_time(f"{day} {hour}:00:00 PM", UTC, now=NOW)
    assert parsed.hour == hour


@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.none(), st.booleans()))
def test_start_time_parser_fails_only_with_field_error(value: object) -> None:
    try:
        parsed = parse_start_time(value, LA, now=NOW)
    except FieldError:
        return
    assert parsed.tzinfo is UTC
    assert datetime(2000, 1, 1, tzinfo=UTC) <= parsed <= NOW + timedelta(days=1)


# --------------------------------------------------------------------------- phone numbers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2165388265, "+12165388265"),
        ("8779257383", "+18779257383"),
        ("+18885551212", "+18885551212"),
        ("18885551212", "+18885551212"),
        ("(909) 390-0003", "+19093900003"),
        ("+44 20 7183 8750", "+442071838750"),
        ("+442071838750", "+442071838750"),
        ("+34 912 345 678", "+34912345678"),
        ("+447911123456", "+447911123456"),
        # E.164 without its "+" (a JSON integer cannot carry one), for the spec's UK and Spain
        (442071838750, "+442071838750"),
        ("447911123456", "+447911123456"),
        (34612345678, "+34612345678"),
        ("34912345678", "+34912345678"),
    ],
)
def test_phone_forms(value: object, expected: str) -> None:
    assert normalize_phone_number(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "123",
        "+11234567890",
        "5555551234",
        "+4412",
        "4412",  # not a UK number either way
        33123456789,  # France without "+": only the spec's UK and Spain are read so
        "not a number",
        1.5,
        True,
        None,
        "+" + "9" * 40,
    ],
)
def test_impossible_phone_numbers_are_rejected(value: object) -> None:
    with pytest.raises(FieldError):
        normalize_phone_number(value)


REGIONS = ["US", "CA", "GB", "ES", "FR", "DE", "MX", "AU"]


@st.composite
def valid_numbers(draw: st.DrawFn) -> phonenumbers.PhoneNumber:
    region = draw(st.sampled_from(REGIONS))
    kind = draw(
        st.sampled_from(
            [phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE]
        )
    )
    example = phonenumbers.example_number_for_type(region, kind)
    assume(example is not None)
    assert example is not None
    return example


@given(valid_numbers(), st.sampled_from(list(phonenumbers.PhoneNumberFormat.__dict__)))
def test_every_format_of_a_valid_number_normalizes_to_its_e164(
    number: phonenumbers.PhoneNumber, format_name: str
) -> None:
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    fmt = getattr(phonenumbers.PhoneNumberFormat, format_name)
    if not isinstance(fmt, int) or fmt == phonenumbers.PhoneNumberFormat.RFC3966:
        return
    text = phonenumbers.format_number(number, fmt)
    if fmt == phonenumbers.PhoneNumberFormat.NATIONAL and number.country_code != 1:
        return  # without '+' a national number is read as NANP by contract
    assert normalize_phone_number(text) == e164
    assert normalize_phone_number(e164) == e164  # idempotent


@given(
    st.sampled_from(["201", "212", "415", "617", "713", "909", "216"]),
    st.integers(min_value=2, max_value=9),
    st.integers(min_value=0, max_value=99),
    st.integers(min_value=0, max_value=9999),
)
def test_nanp_integer_string_and_e164_agree(area: str, a: int, b: int, line: int) -> None:
    national = f"{area}{a}{b:02d}{line:04d}"
    assume(phonenumbers.is_valid_number(phonenumbers.parse("+1" + national)))
    assert normalize_phone_number(int(national)) == "+1" + national
    assert normalize_phone_number(national) == "+1" + national
    assert normalize_phone_number("+1" + national) == "+1" + national


@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.none(), st.booleans()))
def test_phone_parser_fails_only_with_field_error(value: object) -> None:
    try:
        normalized = normalize_phone_number(value)
    except FieldError:
        return
    assert normalized.startswith("+")
    assert phonenumbers.is_valid_number(phonenumbers.parse(normalized))


# --------------------------------------------------------------------------- signal values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, True),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("TRUE", True),
        ("False", False),
        ("yes", True),
        ("No", False),
        ("YES", True),
        ("1", True),
        ("0", False),
    ],
)
def test_signal_values(value: object, expected: bool) -> None:
    assert parse_signal_value(value) is expected


@pytest.mark.parametrize("value", [2, -1, "maybe", "", 1.0, [], {}, "y", "t"])
def test_other_signal_values_are_rejected(value: object) -> None:
    with pytest.raises(FieldError):
        parse_signal_value(value)
