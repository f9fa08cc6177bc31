"""Every recorded history replays on today's workflow code. A failure here means a change would
break the workflows already running: guard it with ``workflow.patched`` (docs/versioning.md).
The histories are recorded by ``python -m tests.histories.record``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.histories.record import HISTORIES, PATHS, payload_text, recorded_files
from worker import WORKFLOWS

HISTORY_FILES = sorted(HISTORIES.glob("*.json"))


def workflow_type(history_file: Path) -> str:
    started = json.loads(history_file.read_text())["events"][0]
    return str(started["workflowExecutionStartedEventAttributes"]["workflowType"]["name"])


@pytest.mark.parametrize("history_file", HISTORY_FILES, ids=lambda p: p.stem)
async def test_recorded_history_replays_on_the_current_code(history_file: Path) -> None:
    history = WorkflowHistory.from_json(history_file.stem, history_file.read_text())
    await Replayer(workflows=WORKFLOWS).replay_workflow(history)


def test_every_registered_workflow_has_a_recorded_history() -> None:
    registered = {workflow._Definition.must_from_class(cls).name for cls in WORKFLOWS}
    recorded = {workflow_type(f) for f in HISTORY_FILES}
    assert registered - recorded == set(), "record a history for each new workflow type"


def test_the_directory_holds_exactly_what_the_recorder_records() -> None:
    """No stale file, none missing: a re-recorded path keeps its old file in KEPT."""
    stems = [f.stem for f in HISTORY_FILES]
    assert len(set(recorded_files())) == len(recorded_files()), "a file stem recorded twice"
    assert sorted(stems) == sorted(recorded_files())
    assert len({p.name for p in PATHS}) == len(PATHS)


def test_recorded_histories_hold_no_msisdn() -> None:
    """Inputs carry subscriber ids, never MSISDNs; carrier messages are masked. Payloads are
    base64 in the JSON, so they are decoded before looking."""
    number = re.compile(r"(?:\+|tel:|msisdn[\"=:]\s*)\d{8,15}", re.IGNORECASE)
    for history_file in HISTORY_FILES:
        text = "\n".join(payload_text(json.loads(history_file.read_text())))
        assert number.findall(text) == [], history_file.name
