"""Request and response bodies: every field described, so /openapi.json is the reference."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, GetPydanticSchema, StringConstraints, WithJsonSchema
from pydantic_core import core_schema
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from app.db.models import EVENT_TYPES_NEGATIVE, EVENT_TYPES_POSITIVE
from app.timestamps import iso_epoch_seconds

_CONTROL_CHARS = r"\x00-\x1f\x7f"  # one rule: checked in Python (_printable) and by pydantic-core (PRINTABLE)
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")


def _printable(value: str) -> str:
    """Ids travel into SQL, logs and CSV exports: no control characters, no lone surrogates."""
    if _CONTROL.search(value):  # one C scan: a per-character generator cost ~5 µs of every request
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 text") from exc
    return value


# The event body's ids check the same in pydantic-core's own regex: a Python validator per field cost
# more than the rest of parsing a batch (1000 events: 3.5 against 1.4 ms with the TypedDict below). Lone
# surrogates cannot arrive there: the JSON parser refuses an unpaired \\ud800 escape as invalid JSON.
PRINTABLE = f"^[^{_CONTROL_CHARS}]*$"
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=PRINTABLE)]
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=PRINTABLE)]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Source = Literal["model", "model+recent", "fold_in", "popular"]
TIMESTAMP_MAX = 4_102_444_800.0  # 2100-01-01
TIMESTAMP_RULE = (
    "must be epoch seconds from 0 to 4102444800, or an ISO 8601 date-time from 1970 to 2100 "
    "(without an offset it is UTC)"
)


def _epoch_seconds(text: str) -> float:
    """ISO 8601 text as epoch seconds, in the API's range."""
    seconds = iso_epoch_seconds(text)
    if not 0 <= seconds <= TIMESTAMP_MAX:
        raise ValueError("outside 1970 to 2100")
    return seconds


# Numbers take the first branch in pydantic-core alone: the Python conversion runs only for strings (a
# numeric string still reads as a number, as before). One error with one message, not one per branch.
Timestamp = Annotated[
    float,
    GetPydanticSchema(lambda _type, _handler: core_schema.union_schema(
        [
            core_schema.float_schema(ge=0, le=TIMESTAMP_MAX, allow_inf_nan=False),
            core_schema.no_info_after_validator_function(_epoch_seconds, core_schema.str_schema(strict=True)),
        ],
        custom_error_type="timestamp_invalid",
        custom_error_message=TIMESTAMP_RULE,
    )),
    WithJsonSchema({
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": TIMESTAMP_MAX},
            {"type": "string", "format": "date-time"},
        ],
    }),
]


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["not_found"])
    message: str = Field(description="Human-readable explanation.", examples=["unknown item 'i999'"])
    details: Any = Field(None, description="Per-field validation errors or other context; may be null.")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorInfo = Field(description="What went wrong.")


class Because(BaseModel):
    item_id: str = Field(description="An item the user interacted with.", examples=["i7"])
    contribution: float = Field(
        description="Dot product of this history item's embedding with the recommended item's embedding "
        "in the served model. For a fold-in user of a checkpoint without a user tower (vector = mean of n "
        "history items) the item's share of the score is exactly contribution / n; otherwise it is the "
        "item-item similarity.",
        examples=[0.83],
    )


class ScoredItem(BaseModel):
    item_id: str = Field(description="External item id.", examples=["i42"])
    score: float = Field(
        description="Dot product of user and item embeddings (model, model+recent and fold_in) or the item's "
        "training interaction count (popular). Higher is better.",
        examples=[3.21],
    )
    rank: int = Field(description="1-based position in the list.", ge=1, examples=[1])
    because: list[Because] | None = Field(
        None,
        description="Only with `explain=true` on recommendations: up to 3 items from the user's history "
        "(positive events recorded since the watermark first, then checkpoint positives, less the items "
        "disliked since) with the largest positive item-item "
        "dot product with this item, largest first. Empty for the `popular` source.",
        examples=[[{"item_id": "i7", "contribution": 0.83}]],
    )


class Recommendations(BaseModel):
    user_id: str = Field(description="The user the list is for.", examples=["u1"])
    model_version: str = Field(
        description="Checkpoint version that produced the list.", examples=["20261123T2100Z-a1b2c3"]
    )
    request_id: str = Field(description="Same as the X-Request-ID response header; logged with impressions.")
    source: Source = Field(
        description="Which path served the user: `model` (user in the checkpoint, nothing since its "
        "watermark that changes their vector: the trained vector and its precomputed list), `model+recent` "
        "(user in the checkpoint, vector remade from their positives plus the positive events since the "
        "watermark minus the items disliked since), `fold_in` (unknown to the model, vector made from the "
        "items of their positive events), `popular` (no usable events)."
    )
    items: list[ScoredItem] = Field(
        description="Best first; at most k; hidden and excluded items never appear."
    )


class SimilarItems(BaseModel):
    item_id: str = Field(description="The query item.", examples=["i42"])
    model_version: str = Field(description="Checkpoint version that produced the list.")
    request_id: str = Field(description="Same as the X-Request-ID response header.")
    items: list[ScoredItem] = Field(
        description="Most similar first (dot product); the query item is excluded."
    )


class EventIn(TypedDict):
    """One interaction or feedback event. Unknown users and items are created."""

    # a TypedDict, not a model: the batch path wants plain dicts, and pydantic builds them ~2x faster
    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        extra="forbid",
        json_schema_extra={
            "examples": [{"event_id": "e-1", "user_id": "u1", "item_id": "i42", "type": "click"}]
        },
    )

    event_id: Annotated[EventId, Field(
        description="Client-chosen idempotency key (1–128 printable characters): a retried event with the "
        "same id is counted as a duplicate and not stored twice."
    )]
    user_id: Annotated[ExternalId, Field(description="External user id, 1–256 printable characters.")]
    item_id: Annotated[ExternalId, Field(description="External item id, 1–256 printable characters.")]
    type: Annotated[EventType, Field(
        description="Event type: lowercase letters, digits and `_`, starting with a letter, at most 32 "
        "characters. Usual positives: " + ", ".join(EVENT_TYPES_POSITIVE) + ". Types listed in "
        "RECSYS_NEGATIVE_TYPES (default " + ", ".join(EVENT_TYPES_NEGATIVE) + ") are explicit negative "
        "feedback: never used as positives or for fold-in, fed to the feedback sampler.",
        examples=["click"],
    )]
    value: NotRequired[Annotated[float | None, Field(
        description="Optional finite number, e.g. a rating.", allow_inf_nan=False, examples=[4.5]
    )]]
    timestamp: NotRequired[Annotated[Timestamp | None, Field(
        description="When it happened: epoch seconds (0 to 4102444800) or an ISO 8601 / RFC 3339 date-time "
        "such as `2026-12-07T10:15:00Z` (an offset is honoured, none means UTC; 1970 to 2100). Stored as "
        "epoch seconds. Defaults to the server's clock.",
        examples=[1796638500, "2026-12-07T10:15:00Z"],
    )]]


class EventsAccepted(BaseModel):
    received: int = Field(description="Events in the request.", examples=[3])
    accepted: int = Field(description="Events newly stored (committed before this answer).", examples=[2])
    duplicates: int = Field(
        description="Events whose event_id was already stored (or repeated inside this request).",
        examples=[1],
    )


class Health(BaseModel):
    status: Literal["ok"] = Field(description="Always `ok` while the process answers.")


class Readiness(BaseModel):
    status: Literal["ready"] = Field(description="`ready` once a model is loaded.")
    model_version: str = Field(description="The served checkpoint version.")


class Negative(BaseModel):
    item_id: str = Field(description="External item id of the sampled negative.")
    source: str = Field(description="Sampler that produced it (uniform, popularity, hard, feedback, …).")
    q: float | None = Field(
        None, description="Probability under which the source drew it (for logQ correction)."
    )
    score: float | None = Field(None, description="Model score of the user for this item.")
    rank: int | None = Field(None, description="Rank of the item in the user's full ranking (1 = best).")
    popularity: float | None = Field(None, description="Training interaction count of the item.")
    known_positive: bool | None = Field(
        None,
        description="True when the user has interacted with it: a false negative, which training left out "
        "of its loss when the summary's `known_positives_masked` is true.",
    )


class NegativesResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    user_id: str = Field(description="The user.")
    strategy: str = Field(
        description="Strategy drawn with: the one the model was trained with when `trained` was asked."
    )
    requested: str = Field(description="The `strategy` parameter as given (`trained` or a strategy name).")
    sampler: dict[str, Any] = Field(
        description="The sampler configuration drawn with: the checkpoint's recorded `config.sampler` (with "
        "`strategy` replaced when a strategy was named), its training `batch_size` (the size of the "
        "simulated batch behind in-batch negatives) and `recorded` (false: the checkpoint records no "
        "sampler configuration and the trainer's defaults stand in)."
    )
    model_version: str = Field(description="Served checkpoint version the sampler ran against.")
    negatives: list[Negative] = Field(description="The drawn negatives.")
    summary: dict[str, Any] = Field(
        description="Aggregate diagnostics of the draw: `sources` (per source, its draws per training row "
        "and how many are shown), mean score against the user's mean positive score, `easy_share`, "
        "`known_positive_share`, `known_positives_masked` (true: the model was trained with such draws left "
        "out of its loss, `recsys train --mask-known`, the default), median rank."
    )


class ModelInfo(BaseModel):
    version: str = Field(description="Model version id.")
    path: str = Field(description="Checkpoint directory.")
    status: str = Field(description="candidate, promoted or rejected.")
    created_at: str | None = Field(None, description="When the version was registered (ISO 8601).")
    promoted_at: str | None = Field(None, description="When it was last promoted (ISO 8601).")
    watermark: int | None = Field(None, description="Largest events.id the model was trained on.")
    metrics: dict[str, Any] = Field(description="Evaluation metrics recorded with the version.")
    diagnostics: list[dict[str, Any]] = Field(
        description="Per-epoch negative-sampling diagnostics from the checkpoint manifest "
        "(empty if unreadable)."
    )
    served: bool = Field(description="True when this worker is serving this version.")


class ModelsResponse(BaseModel):
    served_version: str | None = Field(
        description="The version this worker serves (null before the first load)."
    )
    served_path: str | None = Field(description="Checkpoint directory of the served version.")
    refused: dict[str, str] = Field(description="Versions this worker refused to load, with the reason.")
    models: list[ModelInfo] = Field(description="Registered versions, newest first.")


class ReloadResponse(BaseModel):
    model_version: str = Field(description="The version served after the reload.")
    changed: bool = Field(description="True when the reload swapped in a different version.")
    load_seconds: float | None = Field(None, description="Time the new checkpoint took to load.")


class RollbackResponse(ReloadResponse):
    rejected_version: str = Field(description="The version that was promoted before, now `rejected`.")


MAX_ATTRIBUTES_BYTES = 16 * 1024  # serialized JSON (UTF-8) of one attributes object


class ItemIn(BaseModel):
    """Create or update an item. Omitted fields keep their stored value."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"attributes": {"title": "Heat", "categories": ["crime", "drama"]}, "hidden": False}]
        },
    )

    attributes: dict[str, Any] | None = Field(
        None,
        description="Free JSON object, replaced as a whole; at most 16 KiB serialized as UTF-8 JSON (413 "
        "`attributes_too_large` beyond). `categories` (list of strings) and `category` (string) are what "
        "`category=` filters on. NaN/Infinity are rejected.",
    )
    hidden: bool | None = Field(
        None,
        description="Hidden items are never recommended, returned as similar, popular or latest. Takes "
        "effect at once on the worker that answers, within RECSYS_RELOAD_POLL_SECONDS on the others.",
    )


class UserIn(BaseModel):
    """Create or update a user. An omitted `attributes` keeps the stored value."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"attributes": {"country": "FR", "plan": "pro"}}]}
    )

    attributes: dict[str, Any] | None = Field(
        None,
        description="Free JSON object, replaced as a whole; at most 16 KiB serialized as UTF-8 JSON (413 "
        "`attributes_too_large` beyond). NaN/Infinity are rejected.",
    )


class ItemOut(BaseModel):
    item_id: str = Field(description="External item id.", examples=["i42"])
    attributes: dict[str, Any] = Field(description="Stored attributes (`{}` when none).")
    hidden: bool = Field(description="True when the item is never served.")
    created_at: str | None = Field(None, description="When the item was first recorded (ISO 8601).")


class UserOut(BaseModel):
    user_id: str = Field(description="External user id.", examples=["u1"])
    attributes: dict[str, Any] = Field(description="Stored attributes (`{}` when none).")
    created_at: str | None = Field(None, description="When the user was first recorded (ISO 8601).")


class CountedItem(BaseModel):
    item_id: str = Field(description="External item id.", examples=["i42"])
    count: int = Field(description="Positive events on the item in the window.", ge=1, examples=[17])
    rank: int = Field(description="1-based position in the list.", ge=1, examples=[1])


class PopularItems(BaseModel):
    window_seconds: int = Field(description="The window, in seconds.", examples=[604800])
    since: float = Field(description="Events with `timestamp >=` this (epoch seconds) were counted.")
    computed_at: float = Field(description="When the list was computed (epoch seconds); cached for 10 s.")
    request_id: str = Field(description="Same as the X-Request-ID response header.")
    items: list[CountedItem] = Field(description="Most positive events first; at most k; no hidden item.")


class DatedItem(BaseModel):
    item_id: str = Field(description="External item id.", examples=["i42"])
    created_at: str | None = Field(description="When the item was first recorded (ISO 8601).")
    rank: int = Field(description="1-based position in the list.", ge=1, examples=[1])


class LatestItems(BaseModel):
    computed_at: float = Field(description="When the list was computed (epoch seconds); cached for 10 s.")
    request_id: str = Field(description="Same as the X-Request-ID response header.")
    items: list[DatedItem] = Field(description="Newest first; at most k; no hidden item.")
