"""Settings the actors read on every use. The daemon builds a new ``Live`` from each
accepted config and swaps it in (``LiveRef.current``); actors never cache it across
rounds, so a reload reaches them at their next round without a restart."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from actors.idcode import CodeKeys
from actors.rules import Classifier
from apns.sender import SenderConfig


@dataclass(frozen=True)
class Live:
    classifier: Classifier
    codes: CodeKeys
    node_count: int = 2
    node_batch: int = 200
    node_lanes: int = 4
    lease_seconds: float = 60.0
    shard_by: str = "device"
    region_attribute: str = "region"
    regions: tuple[str, ...] = ()
    retry_initial: float = 5.0
    retry_max: float = 600.0
    max_attempts: int = 8
    default_ttl: float = 86_400.0
    retention: float = 7 * 86_400.0
    sweep_interval: float = 5.0
    store_batch: int = 500
    default_deadline: float = 3600.0
    max_repushes: int = 3
    # How nodes reach APNs; ``apns_generation`` changes when credentials or endpoint do,
    # and nodes then replace their sender between two batches.
    sender_config: Callable[[], SenderConfig] | None = None
    apns_generation: int = 0
    apns_environment: str = "simulator"  # production/sandbox: devices of the other one are skipped

    def shard_of(self, device_id: str, attributes: Mapping[str, Any] | None = None) -> int:
        """Which node owns a device: by a stable hash of its id, or by region."""
        if self.shard_by == "region" and attributes is not None:
            region = attributes.get(self.region_attribute)
            if isinstance(region, str) and region in self.regions:
                return self.regions.index(region) % self.node_count
        digest = hashlib.blake2b(device_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.node_count

    def retry_delay(self, attempts: int) -> float:
        return float(min(self.retry_max, self.retry_initial * 2 ** max(0, attempts - 1)))


class LiveRef:
    """A mutable holder: ``ref.current`` is always the settings in force."""

    def __init__(self, live: Live) -> None:
        self.current = live
