"""What a local activity leaves in a workflow history: a ``MarkerRecorded`` event whose
``data`` detail is plain JSON written by the SDK's core (activity type and id, attempt,
schedule and completion times); its result is a payload like any other (sealed by the codec)."""

from __future__ import annotations

import json
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

LOCAL_ACTIVITY_MARKER = "core_local_activity"


def local_activity(event: HistoryEvent) -> dict[str, Any] | None:
    """A local activity marker's data, else None."""
    if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
        return None
    marker = event.marker_recorded_event_attributes
    if marker.marker_name != LOCAL_ACTIVITY_MARKER or "data" not in marker.details:
        return None
    payloads = marker.details["data"].payloads
    try:
        value = json.loads(payloads[0].data) if payloads else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
