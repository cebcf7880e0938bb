"""One evaluation on two processes: both cores for one request (latency mode, Linux).

SEAL's Python bindings hold the GIL, so threads cannot share an evaluation; processes can, but a
ciphertext costs about 10 ms to hand over (SEAL's save compresses, its load checks), close to one
rotation's time. So the split is coarse: a helper process, forked once from the evaluating
process (it shares the keys and the encoded weights copy-on-write), evaluates the same plan in
lockstep. In a linear layer with many baby steps each process rotates by half of them and adds
its half of the products (both still rotate every giant step); the two halves are exchanged, one
ciphertext each way, and both continue from the same sum (CKKS addition is exact, so the two
processes hold the same ciphertext). Every other instruction runs in both. The helper stops after
the last shared layer. Conv layers with 8 baby steps then cost 4 + 7 rotations and half the
products on each core instead of 8 + 7 and all of them.

Nothing crosses the pipe but SEAL's own ciphertext format, checked on load.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import threading

from medhe.errors import BackendError

# A linear layer is shared when it has at least this many non-zero baby steps: with fewer, the
# two hand-overs (about one rotation each) cost more than the rotations saved.
MIN_SHARED_BABIES = 4

# The longest wait for the other process's half of a layer (a layer takes well under a second
# on an idle core): past it the helper is taken to hang, e.g. on a lock another thread of the
# parent held when it forked, and the evaluation fails instead of waiting for ever.
EXCHANGE_TIMEOUT_S = 120.0

_FRAME = struct.Struct("<cQ")  # tag, payload length
_INPUT, _PART, _ERROR = b"I", b"P", b"E"


class _Timeout(Exception):
    pass


def _send(fd: int, tag: bytes, payload: bytes, timeout_s: float | None = None) -> None:
    """Write one frame. On a non-blocking `fd` (the parent's end), _Timeout when the other side
    takes nothing for `timeout_s`."""
    view, written = memoryview(_FRAME.pack(tag, len(payload)) + payload), 0
    while written < len(view):
        try:
            written += os.write(fd, view[written:])
        except BlockingIOError:
            if not select.select([], [fd], [], timeout_s)[1]:
                raise _Timeout from None


def _read_exactly(fd: int, size: int, timeout_s: float | None) -> bytes | None:
    chunks, left = [], size
    while left:
        if timeout_s is not None and not select.select([fd], [], [], timeout_s)[0]:
            raise _Timeout
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int, timeout_s: float | None = None) -> tuple[bytes, bytes] | None:
    """The next frame, None at end of file; with `timeout_s`, _Timeout when the other side
    sends nothing for that long."""
    header = _read_exactly(fd, _FRAME.size, timeout_s)
    if header is None:
        return None
    tag, size = _FRAME.unpack(header)
    payload = _read_exactly(fd, size, timeout_s)
    return None if payload is None else (tag, payload)


def shared_babies(ins, role: int) -> list[int] | None:
    """The baby steps process `role` (0 or 1) takes in a shared linear layer, or None when the
    layer is not shared. Process 0 takes the unrotated term. The steps come from the pairs, each
    once, so no term can be counted by both processes."""
    babies = sorted({b for _, b in ins.pairs}, key=lambda b: (b != 0, abs(b), b))
    if sum(1 for b in babies if b) < MIN_SHARED_BABIES:
        return None
    return babies[role::2]


class Partner:
    """One side's end of the exchange (`Executor.partner` while a shared evaluation runs)."""

    def __init__(self, backend, role: int, read_fd: int, write_fd: int) -> None:
        self.backend, self.role = backend, role
        self._read_fd, self._write_fd = read_fd, write_fd

    def share(self, ins) -> list[int] | None:
        return shared_babies(ins, self.role)

    def combine(self, acc):
        """acc + the other process's half of the same layer."""
        data = self.backend.serialize(acc)
        failure: list[BaseException] = []
        # The sender writes through a descriptor of its own: if this side gives up and closes
        # its pipes, a sender still waiting cannot write into a file that reuses the number.
        write_fd = os.dup(self._write_fd)

        def send() -> None:
            try:
                _send(write_fd, _PART, data, EXCHANGE_TIMEOUT_S)
            except (OSError, _Timeout) as exc:
                failure.append(exc)
            finally:
                os.close(write_fd)

        # Both sides send at once: a thread writes while this one reads, so neither blocks on a
        # full pipe (os.write releases the GIL).
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            frame = _receive(self._read_fd, EXCHANGE_TIMEOUT_S)
        except _Timeout:
            raise BackendError(f"the helper process of a two-process evaluation sent nothing for "
                               f"{EXCHANGE_TIMEOUT_S:.0f} s") from None
        sender.join(EXCHANGE_TIMEOUT_S)
        if sender.is_alive():
            raise BackendError("the helper process of a two-process evaluation does not read its input")
        if frame is None:
            raise BackendError("the helper process of a two-process evaluation ended")
        tag, payload = frame
        if tag == _ERROR:
            raise BackendError(f"the helper process of a two-process evaluation failed: {payload.decode(errors='replace')}")
        if tag != _PART or failure:
            raise BackendError("the two processes of an evaluation lost step with each other")
        return self.backend.add_inplace(acc, self.backend.deserialize(payload))


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 4096


def last_shared_instruction(plan) -> int | None:
    shared = [i for i, ins in enumerate(plan.instructions) if ins.kind == "linear" and shared_babies(ins, 0)]
    return shared[-1] if shared else None


def _helper(executor, read_fd: int, write_fd: int, stop_after: int) -> None:
    executor.partner = Partner(executor.backend, 1, read_fd, write_fd)
    while (frame := _receive(read_fd)) is not None:
        tag, payload = frame
        if tag != _INPUT:
            return
        try:
            executor.run(executor.backend.deserialize(payload), stop_after=stop_after)
        except Exception as exc:  # the parent raises it at its next exchange
            _send(write_fd, _ERROR, f"{type(exc).__name__}: {exc}".encode())
            return


class TwoProcessExecutor:
    """`run` like an Executor's, with a forked helper sharing the linear layers (see the module
    docstring). Fork it from a process whose other threads hold no lock the helper needs (a
    benchmark, a session, a worker process); the helper is restarted after any failure and ended
    by `close` (or when this process exits)."""

    def __init__(self, executor) -> None:
        if not hasattr(os, "fork"):
            raise BackendError("two-process evaluation needs os.fork (Linux or macOS)")
        self.executor = executor
        self.stop_after = last_shared_instruction(executor.plan)
        self._pid: int | None = None
        self._read_fd = self._write_fd = -1
        self._lock = threading.RLock()

    @property
    def shares_work(self) -> bool:
        return self.stop_after is not None

    @property
    def backend(self):
        return self.executor.backend

    @property
    def plan(self):
        return self.executor.plan

    def _start(self) -> None:
        to_helper_r, to_helper_w = os.pipe()
        from_helper_r, from_helper_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (to_helper_r, to_helper_w, from_helper_r, from_helper_w):
                os.close(fd)
            raise BackendError(f"could not fork the helper of a two-process evaluation: {exc}") from exc
        if pid == 0:  # the helper: never returns into the caller's code
            code = 1
            try:
                # Keep only its own two pipe ends: a copy of another pipe's write end (another
                # key set's helper, a server socket) would keep that one open after its owner died.
                low, high = sorted((to_helper_r, from_helper_w))
                os.closerange(3, low)
                os.closerange(low + 1, high)
                os.closerange(high + 1, _max_fd())
                _helper(self.executor, to_helper_r, from_helper_w, self.stop_after)
                code = 0
            finally:
                os._exit(code)
        os.close(to_helper_r)
        os.close(from_helper_w)
        os.set_blocking(to_helper_w, False)  # writes to a helper that stopped reading time out
        self._pid, self._read_fd, self._write_fd = pid, from_helper_r, to_helper_w

    def run(self, ct, *, input_bytes: bytes | None = None, **kwargs):
        """Evaluate `ct` (`input_bytes`: its serialized form, when the caller has it)."""
        with self._lock:  # one evaluation at a time: the two processes go in lockstep
            return self._run(ct, input_bytes, kwargs)

    def _run(self, ct, input_bytes: bytes | None, kwargs: dict):
        if not self.shares_work:
            return self.executor.run(ct, **kwargs)
        executor = self.executor
        data = bytes(input_bytes) if input_bytes is not None else executor.backend.serialize(ct)
        try:
            self._hand_over(data)
            executor.partner = Partner(executor.backend, 0, self._read_fd, self._write_fd)
            return executor.run(ct, **kwargs)
        except BaseException:
            self.close()  # the helper may be mid-layer: a fresh one starts with the next run
            raise
        finally:
            executor.partner = None

    def _hand_over(self, data: bytes) -> None:
        """Send the input to the helper, starting one first if there is none (or it has ended:
        killed, or failed after this process's last exchange with it)."""
        if self._pid is not None and select.select([self._read_fd], [], [], 0)[0]:
            self.close()  # it said something between evaluations (an error, or it ended): a new one
        for attempt in range(2):
            if self._pid is None:
                self._start()
            try:
                _send(self._write_fd, _INPUT, data, EXCHANGE_TIMEOUT_S)
                return
            except BrokenPipeError:
                self.close()
                if attempt:
                    raise BackendError("could not start the helper process of a two-process evaluation") from None
            except _Timeout:
                self.close()
                raise BackendError(f"the helper process of a two-process evaluation took no input for "
                                   f"{EXCHANGE_TIMEOUT_S:.0f} s") from None

    @property
    def helper_pid(self) -> int | None:
        return self._pid

    def close(self) -> None:
        """End the helper (after the evaluation in progress, if any); the next run starts one."""
        with self._lock:
            if self._pid is not None:
                try:
                    os.kill(self._pid, signal.SIGKILL)
                    os.waitpid(self._pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                self._pid = None
            for fd in (self._read_fd, self._write_fd):
                if fd >= 0:
                    os.close(fd)
            self._read_fd = self._write_fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
