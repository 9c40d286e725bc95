"""The zoo: its injections are documented, cover every bug class, apply from outside the engine
and undo cleanly, each misbehaves against the clean engine, and ``lockstep zoo`` reports."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from lockstep.ci.targeted import TARGETED
from lockstep.ci.watchdog import watchdog
from lockstep.ci.zoo import CLASSES, INJECTIONS, Patcher
from lockstep.ci.zoo.runner import verdict
from lockstep.ci.zoo.witness import (LAZY, SKEWED, SYNC, THREADED, Witness, demonstrate,
                                     departures, run_bare)

torch.set_num_threads(1)


def test_at_least_30_injections_cover_every_class_and_the_hard_ones_several_times():
    assert len(INJECTIONS) >= 30
    per_class = {c: [i for i in INJECTIONS.values() if i.bug_class == c] for c in CLASSES}
    assert all(per_class.values()), {c: len(v) for c, v in per_class.items()}
    async_only = [i for i in INJECTIONS.values() if "Async only" in i.doc]
    assert len(async_only) >= 10


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_each_injection_is_documented_and_patches_named_attributes_that_undo(name):
    injection = INJECTIONS[name]
    assert injection.references and all("#" in ref or "vLLM" in ref or "vllm" in ref
                                        for ref in injection.references)
    assert len(injection.doc.split("\n\n")) >= 2, "a summary and what goes wrong, where"
    assert any(w in injection.doc for w in ("Async only", "Both modes", "both modes"))
    patch = Patcher()
    injection.apply(patch)
    replaced = [(owner, attr, inspect.getattr_static(owner, attr))
                for owner, attr, _ in patch._undo]
    assert replaced, "an injection patches at least one named attribute"
    originals = [(owner, attr, old) for owner, attr, old in patch._undo]
    patch.undo()
    for (owner, attr, old), (_, _, new) in zip(originals, replaced):
        assert inspect.getattr_static(owner, attr) is old and new is not old


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_each_injection_misbehaves_against_the_clean_engine(name):
    injection = INJECTIONS[name]

    def apply():
        patch = Patcher()
        injection.apply(patch)
        return patch.undo
    with watchdog(f"demonstration of {name}", stall_s=3):
        shown = demonstrate(injection.witness, apply)
    assert any(f": {kind}: " in shown for kind in injection.witness.expect), shown


@pytest.mark.parametrize("mode", [SYNC, LAZY, THREADED, SKEWED], ids=lambda m: m.name)
def test_the_clean_engine_departs_from_nothing(mode):
    for name, make in TARGETED.items():
        first, second = run_bare(make(), mode), run_bare(make(), mode)
        assert first.error is None and not first.hung and first.leak is None, (name, first)
        assert not first.syncs and departures(first, second) == {}, name


def test_a_noop_injection_is_reported_as_showing_no_misbehaviour():
    with pytest.raises(AssertionError, match="no outputs on mixed_batch"):
        demonstrate(Witness("mixed_batch", LAZY, ("outputs",)), lambda: (lambda: None))


def test_the_verdicts():
    assert verdict({"name": "clean", "gate_s": 30}) is None
    assert "clean engine failed" in verdict({"name": "clean", "caught_by": "property: x"})
    assert verdict({"name": "x", "caught_by": "targeted: differential"}) is None
    assert "escaped" in verdict({"name": "x", "demonstration": "..."})
    assert "no misbehaviour" in verdict({"name": "x", "demonstration_failed": "saw nothing"})
    assert "ran past" in verdict({"name": "x", "error": "worker ran past 600 s"})


def test_lockstep_zoo_runs_injections_in_fresh_processes(tmp_path):
    out = tmp_path / "zoo.json"
    names = "token_after_stop,synchronize_between_steps"
    proc = subprocess.run([sys.executable, "-m", "lockstep", "zoo", "--only", names,
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| token_after_stop | min_tokens, stops and aborts | targeted: invariants |" \
        in proc.stdout
    assert "| synchronize_between_steps | hidden host syncs | targeted: sync_guard (sync) |" \
        in proc.stdout
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["clean", *names.split(",")]
    assert not data["problems"]
    assert all(r["demonstration"] for r in data["results"][1:])


def test_lockstep_zoo_refuses_unknown_names():
    proc = subprocess.run([sys.executable, "-m", "lockstep", "zoo", "--only", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown injections ['nope']" in proc.stderr


def test_the_catalogue_lists_every_injection():
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "zoo.md").read_text()
    missing = [name for name in INJECTIONS if f"| `{name}` |" not in text]
    assert not missing, missing
