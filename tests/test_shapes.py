"""Every time in an answer is RFC 3339 in UTC with six fraction digits (API.md), whatever it was stored with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from service.shapes import timestamp
from tests.support import TIMESTAMP


@pytest.mark.parametrize(
    ("moment", "rendered"),
    [
        (datetime(2026, 12, 4, 15, 3, 7, 123456, tzinfo=UTC), "2026-12-04T15:03:07.123456Z"),
        (datetime(2026, 12, 4, 15, 3, 7, tzinfo=UTC), "2026-12-04T15:03:07.000000Z"),  # a zero fraction stays
        (datetime(2026, 12, 4, 15, 3, 7, 120000, tzinfo=UTC), "2026-12-04T15:03:07.120000Z"),
        (datetime(2026, 12, 4, 15, 3, 7, 1, tzinfo=UTC), "2026-12-04T15:03:07.000001Z"),
        (datetime(2026, 12, 4, 1, 3, 7, 5, tzinfo=timezone(timedelta(hours=2))), "2026-12-03T23:03:07.000005Z"),
        (datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "0001-01-01T00:00:00.000001Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "9999-12-31T23:59:59.999999Z"),
    ],
)
def test_a_timestamp_is_utc_with_six_fraction_digits(moment: datetime, rendered: str) -> None:
    assert timestamp(moment) == rendered
    assert TIMESTAMP.match(timestamp(moment))
