"""The bench's helpers, without running or timing anything: /proc parsing, figure formatting,
the recorded-runs table, and the history split on a recorded history."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory

from bench.billing import QUICK, parse_args
from bench.histories import HistoryTotals, actions_of, latencies, split
from bench.procstat import TICKS, parse_stat
from bench.report import RUNS_HEADING, append_run, percentile, spread

HISTORIES = Path(__file__).resolve().parent / "histories"


def test_parse_stat_counts_fields_after_the_command_name() -> None:
    # a command name with a space and a parenthesis must not shift the fields
    fields = ["S", "41"] + ["0"] * 9 + ["250", "50"] + ["0"] * 10
    ppid, cpu = parse_stat("1234 (my (odd) proc) " + " ".join(fields))
    assert ppid == 41
    assert cpu == pytest.approx(300 / TICKS)


def test_spread_and_percentiles() -> None:
    assert spread([0.86, 0.80, 0.83]) == "0.83 (0.80–0.86)"
    assert spread([95.04], 1) == "95.0"
    assert spread([]) == "n/a"
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def test_recorded_runs_are_appended_under_their_heading(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmark figures\n\nprose\n")
    append_run(doc, ["2026-12-01 10:00", "abc1234", "quick", "1", "2", "0.5", "x", "9", "2",
                     "1, 2, 3, 4"])
    append_run(doc, ["2026-12-02 10:00", "def5678", "a|b", "1", "2", "0.5", "x", "9", "2",
                     "1, 2, 3, 4"])
    lines = doc.read_text().splitlines()
    assert lines[:3] == ["# Benchmark figures", "", "prose"]
    at = lines.index(RUNS_HEADING)
    rows = [row for row in lines[at:] if row.startswith("| 2026")]
    assert [row.split(" | ")[1] for row in rows] == ["abc1234", "def5678"]
    assert "a/b" in rows[1]  # a cell cannot break the table
    header = next(row for row in lines[at:] if row.startswith("| date"))
    assert rows[0].count(" | ") == header.count(" | ")


def test_monthly_history_splits_into_start_steady_cycles_and_cancellation() -> None:
    text = (HISTORIES / "subscription_monthly_cancelled.json").read_text()
    events = list(WorkflowHistory.from_json("subscription-1", text).events)
    parts = split(events, "charge_subscription", ("request_cancel", "cancel"))
    # start: up to the first charge; steady: the two whole cycles between the three charges;
    # cancellation: from the workflow task that carried the cancel update
    assert (parts.start[0].event_id, parts.start[-1].event_id) == (1, 9)
    assert (parts.steady[0].event_id, parts.steady[-1].event_id) == (10, 31)
    assert parts.steady_charges == 2
    assert parts.cancel[0].event_id == 39 and parts.complete
    steady = actions_of(parts.steady)
    assert steady == {"activity attempt": 2, "timer": 2}
    assert actions_of(parts.cancel)["update"] == 1

    found = latencies(parts.steady, "charge_subscription")
    assert len(found.timer_lag) == 2 and all(-0.01 < lag < 0.05 for lag in found.timer_lag)
    assert len(found.activity_run) == 2
    assert found.activity_run[0] == pytest.approx(0.146, abs=1e-6)
    assert all(key and key.endswith("-a0") for key, _ in found.runs_by_key)
    assert len(found.task_total) == len(found.task_queue) == 4

    totals = HistoryTotals()
    totals.add(events, "charge_subscription", ("request_cancel", "cancel"))
    assert totals.per_charge() == (11.0, 2.0)
    assert totals.per_start()[0] == 9.0


def test_quick_fills_only_what_was_not_given() -> None:
    args = parse_args(["--quick", "--subscriptions", "50"])
    assert args.subscriptions == 50
    assert args.window == QUICK["window"]
    assert parse_args([]).pairs == 3
