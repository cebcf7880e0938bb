"""Two-process evaluation (medhe.runtime.split) on the clear backend: the helper's half of each
shared layer is really computed there, the result is the single-process one, and a helper that
fails or dies costs one evaluation at most."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from torch import nn

from medhe.errors import BackendError
from medhe.nn.layers import PolyAct
from medhe.runtime import split
from medhe.runtime.clear import ClearBackend
from medhe.runtime.executor import Executor
from medhe.runtime.split import TwoProcessExecutor, last_shared_instruction
from tests.helpers import compile_torch, pack, randomize_bn, torch_out

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="two-process evaluation forks")


@pytest.fixture(scope="module")
def plan_and_model():
    seq = randomize_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
        nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).double())
    return compile_torch(seq, (1, 16, 16)), seq


def _open_pipes() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(f"{fd}:{target}")
    return found


def _outputs(plan, backend, ct):
    return backend.decrypt(ct)[plan.output_layout.slots(plan.params.slot_count)]


def test_two_processes_give_the_one_process_result_and_share_the_rotations(plan_and_model):
    plan, seq = plan_and_model
    assert last_shared_instruction(plan) is not None  # the 8 -> 8 conv has 8 baby steps
    serial_backend, parent_backend = ClearBackend(plan.params), ClearBackend(plan.params)
    pipes_before = _open_pipes()
    two = TwoProcessExecutor(Executor(plan, parent_backend))
    try:
        for _ in range(3):  # one helper serves evaluation after evaluation
            x = np.random.randn(1, 16, 16)
            ct = serial_backend.encrypt(pack(plan, x))
            serial_backend.rotations = parent_backend.rotations = 0
            expected = _outputs(plan, serial_backend, Executor(plan, serial_backend).run(ct))
            got = _outputs(plan, parent_backend, two.run(ct))
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(got, torch_out(seq, x), rtol=1e-6, atol=1e-6)
            # The helper rotated by half of the shared layers' baby steps: this process did not.
            assert parent_backend.rotations < serial_backend.rotations
    finally:
        two.close()
    assert _open_pipes() <= pipes_before  # no pipe end left behind


def test_a_failing_helper_fails_one_evaluation_clearly_and_the_next_one_works(plan_and_model, monkeypatch):
    plan, seq = plan_and_model
    backend = ClearBackend(plan.params)
    two = TwoProcessExecutor(Executor(plan, backend))
    x = np.random.randn(1, 16, 16)
    ct = backend.encrypt(pack(plan, x))
    real_helper = split._helper

    def failing_helper(executor, read_fd, write_fd, stop_after):
        def fail(*args, **kwargs):
            raise RuntimeError("out of memory in the helper")
        executor.run = fail  # only in the forked helper: this process's executor is a copy
        real_helper(executor, read_fd, write_fd, stop_after)

    try:
        monkeypatch.setattr(split, "_helper", failing_helper)
        with pytest.raises(BackendError, match="helper process .* failed: RuntimeError: out of memory"):
            two.run(ct)
        monkeypatch.setattr(split, "_helper", real_helper)
        np.testing.assert_allclose(_outputs(plan, backend, two.run(ct)), torch_out(seq, x), rtol=1e-6, atol=1e-6)

        os.kill(two._pid, signal.SIGKILL)  # killed between evaluations: a new helper takes over
        os.waitpid(two._pid, 0)
        two._pid = None
        np.testing.assert_allclose(_outputs(plan, backend, two.run(ct)), torch_out(seq, x), rtol=1e-6, atol=1e-6)
    finally:
        two.close()
    assert two._pid is None


def _one_evaluation_with(plan, monkeypatch, helper) -> TwoProcessExecutor:
    """A TwoProcessExecutor whose helper runs `helper`, after one evaluation (it must fail)."""
    backend = ClearBackend(plan.params)
    two = TwoProcessExecutor(Executor(plan, backend))
    monkeypatch.setattr(split, "_helper", helper)
    try:
        two.run(backend.encrypt(pack(plan, np.random.randn(1, 16, 16))))
    finally:
        two.close()
    return two


def test_a_helper_killed_during_an_evaluation_is_an_error_not_a_hang(plan_and_model, monkeypatch):
    def dying_helper(executor, read_fd, write_fd, stop_after):
        os._exit(3)  # dies before its first exchange

    with pytest.raises(BackendError, match="helper process"):
        _one_evaluation_with(plan_and_model[0], monkeypatch, dying_helper)


def test_a_helper_dying_in_the_middle_of_an_evaluation_is_an_error(plan_and_model, monkeypatch):
    def helper_dying_mid_run(executor, read_fd, write_fd, stop_after):
        split._receive(read_fd)  # takes the input, starts, and dies before its half of the layer
        os._exit(3)

    with pytest.raises(BackendError, match="helper process of a two-process evaluation ended"):
        _one_evaluation_with(plan_and_model[0], monkeypatch, helper_dying_mid_run)


def test_a_hanging_helper_is_an_error_after_the_exchange_deadline(plan_and_model, monkeypatch):
    def hanging_helper(executor, read_fd, write_fd, stop_after):
        time.sleep(600)  # e.g. a lock another thread held when the parent forked

    monkeypatch.setattr(split, "EXCHANGE_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(BackendError, match="helper process .* for 1 s"):
        _one_evaluation_with(plan_and_model[0], monkeypatch, hanging_helper)
    assert time.monotonic() - start < 30


def test_small_layers_are_not_shared():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)).double()  # baby steps 0, 1, -1: too few to share
    plan = compile_torch(seq, (1, 8, 8))
    assert [ins.kind for ins in plan.instructions] == ["linear"] and last_shared_instruction(plan) is None
    two = TwoProcessExecutor(Executor(plan, ClearBackend(plan.params)))
    assert not two.shares_work
    backend = two.backend
    x = np.random.randn(1, 8, 8)
    np.testing.assert_allclose(_outputs(plan, backend, two.run(backend.encrypt(pack(plan, x)))), torch_out(seq, x),
                               rtol=1e-6, atol=1e-6)
    assert two._pid is None  # nothing to share: no helper was started


def test_a_server_keeps_one_helper_the_last_clinics(plan_and_model):
    """A helper is a copy of the server process: one at a time, not one per key set in memory."""
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    plan, seq = plan_and_model
    server = Server(plan, backend="clear", two_processes=True)
    clinics = [Client(plan.client_spec(), backend="clear") for _ in range(2)]
    for clinic in clinics:
        server.register_keys(clinic.evaluation_keys())
    helpers = []
    for clinic in clinics + clinics[:1]:
        x = np.random.randn(1, 16, 16)
        np.testing.assert_allclose(clinic.decrypt_logits(server.evaluate(clinic.encrypt_input(x))), torch_out(seq, x),
                                   rtol=1e-6, atol=1e-6)
        alive = [entry.executor.helper_pid for entry in server._key_sets.values()
                 if entry.executor is not None and entry.executor.helper_pid is not None]
        assert len(alive) == 1
        helpers.append(alive[0])
    assert len(set(helpers)) == 3  # each switch of clinic ended the other's helper and forked one
    for pid in helpers[:2]:
        assert not os.path.exists(f"/proc/{pid}")  # ended and reaped
    for entry in server._key_sets.values():
        entry.executor.close()
