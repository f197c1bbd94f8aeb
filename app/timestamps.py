"""Event times as stored: epoch seconds (UTC, float). What converts ISO 8601 text to them, for the API and
for event files alike, so both accept the same forms."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_epoch_seconds(text: str) -> float:
    """An ISO 8601 / RFC 3339 date or date-time as epoch seconds; no offset means UTC, a bare date is its
    midnight. ValueError for anything else. Python's own parser: it takes the usual forms (``Z``, ``+02:00``,
    a space for ``T``, fractions, the basic ``20261207T101500Z``)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
