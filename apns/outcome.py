"""What an APNs response means for the notification and the token (reference section 4).

:func:`classify` maps a status and reason to one of five :class:`OutcomeClass` values;
:meth:`Outcome.from_response` parses a response (never raising on a garbage body).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Outcome", "OutcomeClass", "classify"]

UNPARSABLE = "UnparsableResponse"
CONNECTION_LOST = "ConnectionLost"


class OutcomeClass(StrEnum):
    """What to do after a response.

    - DELIVERED: APNs accepted the notification (200).
    - TOKEN_DEAD: the device token is finished for this topic and environment: do not
      retry, remove the token (410 Unregistered/ExpiredToken, BadDeviceToken,
      DeviceTokenNotForTopic).
    - RETRY: the notification was fine; send it again later, with back-off, possibly on
      a new connection (429, 5xx, Shutdown, IdleTimeout, TooManyProviderTokenUpdates,
      a lost connection).
    - CREDENTIALS: the certificate or provider token was refused (403). The notification
      itself was not judged: refresh the token / fix the credentials, reconnect, and
      resend. ExpiredProviderToken is the one expected in normal operation.
    - REJECTED: APNs refused this notification as sent (other 4xx); resending it
      unchanged will fail again.
    """

    DELIVERED = "delivered"
    TOKEN_DEAD = "token_dead"
    RETRY = "retry"
    CREDENTIALS = "credentials"
    REJECTED = "rejected"


#: Every documented reason string (A-RESP) with its class. Reasons decide before status.
REASONS: dict[str, OutcomeClass] = {
    # 400
    "BadCollapseId": OutcomeClass.REJECTED,
    "BadDeviceToken": OutcomeClass.TOKEN_DEAD,
    "BadExpirationDate": OutcomeClass.REJECTED,
    "BadMessageId": OutcomeClass.REJECTED,
    "BadPriority": OutcomeClass.REJECTED,
    "BadTopic": OutcomeClass.REJECTED,
    "DeviceTokenNotForTopic": OutcomeClass.TOKEN_DEAD,
    "DuplicateHeaders": OutcomeClass.REJECTED,
    "IdleTimeout": OutcomeClass.RETRY,
    "InvalidPushType": OutcomeClass.REJECTED,
    "MissingDeviceToken": OutcomeClass.REJECTED,
    "MissingTopic": OutcomeClass.REJECTED,
    "PayloadEmpty": OutcomeClass.REJECTED,
    "TopicDisallowed": OutcomeClass.REJECTED,
    # 403
    "BadCertificate": OutcomeClass.CREDENTIALS,
    "BadCertificateEnvironment": OutcomeClass.CREDENTIALS,
    "ExpiredProviderToken": OutcomeClass.CREDENTIALS,
    "Forbidden": OutcomeClass.CREDENTIALS,
    "InvalidProviderToken": OutcomeClass.CREDENTIALS,
    "MissingProviderToken": OutcomeClass.CREDENTIALS,
    "UnrelatedKeyIdInToken": OutcomeClass.CREDENTIALS,
    "BadEnvironmentKeyIdInToken": OutcomeClass.CREDENTIALS,
    # 404, 405
    "BadPath": OutcomeClass.REJECTED,
    "MethodNotAllowed": OutcomeClass.REJECTED,
    # 410
    "ExpiredToken": OutcomeClass.TOKEN_DEAD,
    "Unregistered": OutcomeClass.TOKEN_DEAD,
    # 413
    "PayloadTooLarge": OutcomeClass.REJECTED,
    # 429: the token update limit is about the connection, not the notification; the
    # reference says stop regenerating, reuse the token, back off or reconnect. The
    # notification itself is fine, so it is retried (TokenAuth never re-mints on it).
    "TooManyProviderTokenUpdates": OutcomeClass.RETRY,
    "TooManyRequests": OutcomeClass.RETRY,
    # 500, 503
    "InternalServerError": OutcomeClass.RETRY,
    "ServiceUnavailable": OutcomeClass.RETRY,
    "Shutdown": OutcomeClass.RETRY,
}


def classify(status: int, reason: str | None) -> OutcomeClass:
    """The class of a response: 2xx delivered; a known reason decides; then the status."""
    if 200 <= status < 300:
        return OutcomeClass.DELIVERED
    if reason is not None:
        known = REASONS.get(reason)
        if known is not None:
            return known
    if status == 410:
        return OutcomeClass.TOKEN_DEAD
    if status == 403:
        return OutcomeClass.CREDENTIALS
    if status == 429 or status >= 500:
        return OutcomeClass.RETRY
    return OutcomeClass.REJECTED


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one request. ``status`` is None when no response arrived."""

    klass: OutcomeClass
    status: int | None
    reason: str | None
    apns_id: str | None
    timestamp_ms: int | None = None  # 410: when APNs learnt the token was invalid
    retry_after: float | None = None  # seconds, from a Retry-After header if any
    detail: str | None = None  # free text for lost connections and unparsable bodies

    @classmethod
    def from_response(
        cls, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Outcome:
        """Parse a response. A body that is not the documented JSON gives reason
        ``UnparsableResponse`` and is classified by status alone."""
        apns_id: str | None = None
        retry_after: float | None = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"apns-id":
                apns_id = value.decode("ascii", "replace")
            elif lname == b"retry-after":
                retry_after = _parse_retry_after(value)
        if 200 <= status < 300:
            return cls(OutcomeClass.DELIVERED, status, None, apns_id, retry_after=retry_after)
        reason: str | None = None
        timestamp_ms: int | None = None
        detail: str | None = None
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            reason = data["reason"]
            ts = data.get("timestamp")
            if type(ts) is int:
                timestamp_ms = ts
        else:
            reason = UNPARSABLE
            detail = repr(body[:200])
        klass = classify(status, None if reason == UNPARSABLE else reason)
        return cls(klass, status, reason, apns_id, timestamp_ms, retry_after, detail)

    @classmethod
    def connection_lost(cls, detail: str, apns_id: str | None = None) -> Outcome:
        """No response: the stream or connection died first. Always RETRY."""
        return cls(OutcomeClass.RETRY, None, CONNECTION_LOST, apns_id, detail=detail)


def _parse_retry_after(value: bytes) -> float | None:
    """Seconds from a delta-seconds Retry-After; None for dates or garbage."""
    try:
        seconds = float(value.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
