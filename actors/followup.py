"""Follow-ups: what counts as "handled", and what to do when it is not.

A push may carry a follow-up (``push ... follow_up = {...}``)::

    {
      "handled": {"event": "order.paid", "match": {"order_id": "A-17"}},  # an app event ...
      # or      {"registry": {"field": "device.app_version", "semver_ge": "2.0.0"}}  # ... or a registry condition
      "deadline": 3600,          # seconds after delivery to wait for the evidence
      "max_repushes": 2,         # at most this many re-pushes per device
      "spacing": 7200,           # seconds after a re-push's delivery before the next check
      "strategy": "resend",      # or "regenerate"
      "reminder": {...}          # optional notification for the re-push (default: the original)
    }

``resend`` sends the same (or the reminder) notification to the same device again, with a
new apns-id. ``regenerate`` re-resolves the original target for that device — class,
filter, permissions, all re-evaluated on the latest registry data — so a device that no
longer qualifies gets nothing, and one that does gets a new message with a new
identification code.

Evidence is only what the user authorised: app events of kinds the user consented to,
and registry changes (a device re-registering with a newer app version).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from actors.rules import Rule, RuleError, compile_rule
from apns.payload import InvalidNotification, Notification

__all__ = ["FollowUp", "FollowUpError"]

STRATEGIES = ("resend", "regenerate")
KEYS = ("handled", "deadline", "max_repushes", "spacing", "strategy", "reminder")
MAX_REPUSHES = 20


class FollowUpError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class FollowUp:
    event: str | None
    match: Mapping[str, Any]
    registry_spec: Any
    deadline: float
    max_repushes: int
    spacing: float
    strategy: str
    reminder: Mapping[str, Any] | None

    @classmethod
    def parse(
        cls, spec: Any, *, default_deadline: float = 3600.0, default_max: int = 3, path: str = "follow_up"
    ) -> FollowUp:
        if not isinstance(spec, Mapping):
            raise FollowUpError(path, "must be a map")
        for key in spec:
            if key not in KEYS:
                raise FollowUpError(f"{path}.{key}", "unknown key")
        handled = spec.get("handled")
        if not isinstance(handled, Mapping) or len(handled) == 0:
            raise FollowUpError(f"{path}.handled", "must be {event = ..., match = {...}} or {registry = rule}")
        event = None
        match: Mapping[str, Any] = {}
        registry_spec = None
        for key in handled:
            if key not in ("event", "match", "registry"):
                raise FollowUpError(f"{path}.handled.{key}", "unknown key")
        if "registry" in handled:
            if "event" in handled or "match" in handled:
                raise FollowUpError(f"{path}.handled", "give an event or a registry condition, not both")
            registry_spec = handled["registry"]
            try:
                compile_rule(registry_spec, f"{path}.handled.registry")
            except RuleError as exc:
                raise FollowUpError(exc.path, exc.message) from None
        else:
            event = handled.get("event")
            if not isinstance(event, str) or not event:
                raise FollowUpError(f"{path}.handled.event", "must be a non-empty string")
            match = handled.get("match", {})
            if not isinstance(match, Mapping) or not all(isinstance(k, str) for k in match):
                raise FollowUpError(f"{path}.handled.match", "must be a map of attribute values")
        deadline = _seconds(spec, "deadline", default_deadline, path)
        spacing = _seconds(spec, "spacing", deadline, path)
        max_repushes = spec.get("max_repushes", default_max)
        if isinstance(max_repushes, bool) or not isinstance(max_repushes, int) or not 0 <= max_repushes <= MAX_REPUSHES:
            raise FollowUpError(f"{path}.max_repushes", f"must be an integer from 0 to {MAX_REPUSHES}")
        strategy = spec.get("strategy", "resend")
        if strategy not in STRATEGIES:
            raise FollowUpError(f"{path}.strategy", "must be 'resend' or 'regenerate'")
        reminder = spec.get("reminder")
        if reminder is not None:
            if not isinstance(reminder, Mapping):
                raise FollowUpError(f"{path}.reminder", "must be a notification map")
            try:
                Notification.from_dict(reminder).encode()
            except InvalidNotification as exc:
                raise FollowUpError(f"{path}.reminder.{exc.field}", exc.message) from None
        return cls(event, dict(match), registry_spec, deadline, max_repushes, spacing, strategy, reminder)

    def registry_rule(self) -> Rule | None:
        return None if self.registry_spec is None else compile_rule(self.registry_spec, "handled.registry")

    def event_matches(self, name: str, attributes: Mapping[str, Any]) -> bool:
        if self.event is None or name != self.event:
            return False
        return all(attributes.get(k) == v for k, v in self.match.items())

    def to_dict(self) -> dict[str, Any]:
        handled: dict[str, Any] = (
            {"registry": self.registry_spec}
            if self.registry_spec is not None
            else {"event": self.event, "match": dict(self.match)}
        )
        out: dict[str, Any] = {
            "handled": handled,
            "deadline": self.deadline,
            "max_repushes": self.max_repushes,
            "spacing": self.spacing,
            "strategy": self.strategy,
        }
        if self.reminder is not None:
            out["reminder"] = dict(self.reminder)
        return out


def _seconds(spec: Mapping[str, Any], key: str, default: float, path: str) -> float:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 365 * 86400:
        raise FollowUpError(f"{path}.{key}", "must be a number of seconds, more than 0 and at most a year")
    return float(value)
