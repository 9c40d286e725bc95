"""sync_guard against ground truth on a real GPU: the sync corpus (a timing oracle) and the race
corpus (racy or fenced by construction). See ``ci/sync_corpus.py`` and ``ci/race_corpus.py``."""
from __future__ import annotations

import pytest

from lockstep.ci.race_corpus import print_race_report, run_race_corpus
from lockstep.ci.sync_corpus import print_sync_report, run_sync_corpus

pytestmark = pytest.mark.gpu


def _mismatch(row: dict) -> str:
    if row["error"]:
        return f"{row['name']}: error {row['error']}"
    return (f"{row['name']}: oracle={row['oracle']} ({row['oracle_ms']} ms) "
            f"guard={row['guard']} ops={row['guard_ops']}")


def test_sync_guard_matches_the_timing_oracle_on_every_snippet():
    result = run_sync_corpus()
    print_sync_report(result)  # shown with -s or on failure
    summary = result["summary"]
    rows = {row["name"]: row for row in result["snippets"]}
    assert summary["ran"] >= 30, f"only {summary['ran']} snippets ran; skipped {summary['skipped']}"
    assert summary["ok"], "sync_guard disagrees with the oracle:\n" + "\n".join(
        _mismatch(rows[name]) for name in summary["mismatches"])
    misses = summary["torch_debug_misses"]
    assert len(misses) >= 3, f"expected >= 3 true syncs torch's debug mode misses, got {misses}"


def test_race_check_matches_ground_truth_on_every_scenario():
    result = run_race_corpus()
    print_race_report(result)
    summary = result["summary"]
    rows = {row["name"]: row for row in result["scenarios"]}
    assert summary["scored"] >= 12
    assert summary["ok"], "race_check disagrees with ground truth:\n" + "\n".join(
        f"{name}: racy={rows[name]['racy']} detected={rows[name]['detected']} "
        f"error={rows[name]['error']} report={rows[name]['report']}"
        for name in summary["mismatches"])
