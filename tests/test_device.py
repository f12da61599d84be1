"""freed_memory_reused: while a training runs, the memory a step frees stays in the heap for the next step."""

from __future__ import annotations

import pytest
import torch

from llm_mcp.engine.device import can_reuse_freed_memory, freed_memory_reused
from llm_mcp.memory import proc_kib_field

pytestmark = pytest.mark.skipif(not can_reuse_freed_memory() or proc_kib_field("/proc/self/status", "VmRSS") is None,
                                reason="needs glibc's mallopt and Linux's /proc")
STEP_BYTES = 256 << 20  # a training step's activations: blocks of a few MiB, allocated, written, freed


def _resident_bytes_a_step_hands_back() -> int:
    blocks = [torch.empty(((4 + i % 5) << 20) // 4).fill_(1.0) for i in range(STEP_BYTES // (6 << 20))]
    resident = proc_kib_field("/proc/self/status", "VmRSS")
    del blocks
    return resident - proc_kib_field("/proc/self/status", "VmRSS")


def test_freed_memory_stays_for_the_next_step_and_goes_back_after():
    with freed_memory_reused() as applied:
        assert applied
        _resident_bytes_a_step_hands_back()
        assert _resident_bytes_a_step_hands_back() < STEP_BYTES // 10  # kept: the next step faults nothing in
        before_exit = proc_kib_field("/proc/self/status", "VmRSS")
    assert before_exit - proc_kib_field("/proc/self/status", "VmRSS") > STEP_BYTES // 2  # handed back on exit


def test_concurrent_trainings_keep_it_until_the_last_ends():
    """The server runs several trainings at once: the first to end must not take the reuse from the others."""
    with freed_memory_reused():
        with freed_memory_reused() as second:
            assert second
            _resident_bytes_a_step_hands_back()
            before_first_end = proc_kib_field("/proc/self/status", "VmRSS")
        assert before_first_end - proc_kib_field("/proc/self/status", "VmRSS") < STEP_BYTES // 10  # nothing trimmed
        assert _resident_bytes_a_step_hands_back() < STEP_BYTES // 10
        before_exit = proc_kib_field("/proc/self/status", "VmRSS")
    assert before_exit - proc_kib_field("/proc/self/status", "VmRSS") > STEP_BYTES // 2
