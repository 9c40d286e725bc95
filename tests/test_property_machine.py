"""The stateful machine: sync and async engines in lockstep under random operations."""
from __future__ import annotations

from hypothesis import settings

from lockstep.property_tests import profiles
from lockstep.property_tests.machine import EngineMachine

profiles.load()


class TestSyncAndAsyncEnginesAgreeUnderRandomOperations(EngineMachine.TestCase):
    settings = settings(stateful_step_count=40)
