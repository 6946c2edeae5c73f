"""A pool of Ray actors that each own one shard processor: dynamic shard hand-out, retries, recycling.

The pool only sees the contract `processor.setup()` once per actor and `processor.process(url, out_dir) -> stats`
(STYLE.md rule 8). Per actor at most `max_in_flight` shards are queued (one runs, the next waits, so the actor
never idles between shards). A shard whose task raises, or whose actor dies while running it, is retried up to
`max_retries` times and then reported as failed. A shard that was only *queued* on an actor that died is put
back without using up a retry. Actors are killed and restarted every `recycle_every` shards to bound leaks.

A processor error whose `retire_worker` is true (a CUDA fault) also replaces the actor; its queued shards go back
for free, and a retried shard goes to an actor it has not failed on when there is one.

Ownership: the driver alone assigns shards, one actor per shard at a time. Against what it cannot see — a worker
left over from a killed driver, a second driver on the same output, a node cut off — each shard runs under a
lease object (`mlcid.lease`: create-exclusive generations under `OUT/.leases/KEY/`, renewed by a background
thread while the shard runs, checked again right before publishing). No `flock`, so the output may be a local
folder, a FUSE mount or an object store URL; with the processor's stage-locally → publish → stats-last this makes
every shard all-or-nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from cluster.actor import Processor, ShardActor, limit_threads  # noqa: F401 — re-exported
from cluster.pool_config import DEFAULT_RECYCLE_EVERY, PoolConfig  # noqa: F401 — re-exported

log = logging.getLogger(__name__)


class PoolListener(Protocol):
    """Receives live events (the progress line implements it)."""

    def on_shard(self, outcome: "ShardOutcome") -> None: ...

    def on_samples(self, count: int) -> None: ...

    def on_retry(self, task: "ShardTask", error: str) -> None: ...


class PoolError(RuntimeError):
    """The pool cannot make progress (e.g. actors keep dying while loading their models)."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: `key` names the output (and its lock) and must be unique within a run."""

    key: str
    url: str


@dataclass
class ShardOutcome:
    """What became of one shard: its stats when it succeeded, every error otherwise."""

    task: ShardTask
    ok: bool
    stats: dict[str, Any] | None = None
    attempts: int = 0  # runs that counted against the retry budget (+1 for the successful one)
    errors: list[str] = field(default_factory=list)
    actor: int | None = None  # serial number of the actor that finished it
    pid: int | None = None
    node: str | None = None
    process_seconds: float = 0.0  # time inside processor.process (excludes the lease wait)
    cpu_seconds: float = 0.0  # CPU time of the actor process (all threads) during processor.process
    lease_seconds: float = 0.0  # waiting for the shard's lease


@dataclass
class PoolReport:
    """Everything a run produced: one outcome per task, actor counts, timings."""

    outcomes: list[ShardOutcome]
    actors_started: int = 0
    actors_recycled: int = 0
    actors_died: int = 0
    actors_faulted: int = 0  # killed and replaced after a device fault (`retire_worker` on the error)
    startup_seconds: float = 0.0  # pool start → first actor ready (imports + model loading)
    wall_seconds: float = 0.0
    max_in_flight_seen: int = 0  # largest number of shards queued on one actor

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if not o.ok]


@dataclass
class _Slot:
    """One live actor and the shards queued on it (oldest first: the first one is the running one)."""

    serial: int
    handle: Any
    ready_ref: Any
    ready: bool = False
    assigned: int = 0
    retiring: bool = False
    inflight: list[tuple[Any, ShardTask]] = field(default_factory=list)
    poll_ref: Any = None
    samples_seen: int = 0


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def _retires_worker(err: RayTaskError) -> bool:
    """True when the processor's exception asks for its actor to be replaced (e.g. a CUDA fault)."""
    cause = getattr(err, "cause", None)
    return bool(getattr(cause, "retire_worker", False) or getattr(err, "retire_worker", False))


def _error_text(err: BaseException) -> str:
    """A one-line error: the processor's own exception for task errors; for a dead actor Ray's summary plus the
    exception that killed it (Ray puts the creation task's traceback inside the message)."""
    cause = getattr(err, "cause", None) if isinstance(err, RayTaskError) else None
    shown = cause if isinstance(cause, BaseException) else err
    lines = [ln.strip() for ln in _ANSI.sub("", str(shown)).splitlines() if ln.strip()]
    text = f"{type(shown).__name__}: {lines[0] if lines else ''}"
    if len(lines) > 1 and _EXC_LINE.match(lines[-1]):
        text += f" — {lines[-1]}"
    return text[:700]


@dataclass
class _RunState:
    """Book-keeping of one `ShardPool.run`."""

    queue: deque[ShardTask]
    report: PoolReport
    outcomes: dict[ShardTask, ShardOutcome] = field(default_factory=dict)
    attempts: Counter[ShardTask] = field(default_factory=Counter)  # failed runs charged to each shard
    errors: dict[ShardTask, list[str]] = field(default_factory=dict)
    failed_on: dict[ShardTask, set[int]] = field(default_factory=dict)  # actor serials a shard failed on
    first_ready: float | None = None


class ShardPool:
    """Run `make_processor()`-built processors on Ray actors over a list of shards; see the module docstring."""

    def __init__(self, make_processor: Callable[[], Processor], out_dir: str | os.PathLike, config: PoolConfig,
                 listener: PoolListener | None = None) -> None:
        self.make_processor = make_processor
        self.out_dir = str(out_dir)
        self.config = config
        self.listener = listener
        self.slots: list[_Slot] = []
        self._serial = 0
        self._startup_failures = 0
        self._last_poll = 0.0
        self._warm_started = 0  # actors started by `warm_up` before `run`

    # -- actors ---------------------------------------------------------------------------------------------
    def _start_actor(self) -> None:
        cfg = self.config
        handle = ShardActor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=0).remote(
            self.make_processor, cfg.threads, cfg.lease)
        self._serial += 1
        self.slots.append(_Slot(self._serial, handle, handle.ready.remote()))
        log.debug("started actor #%d", self._serial)

    def _remove(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 — already gone
            pass

    def warm_up(self, timeout_s: float | None = None) -> float:
        """Start `workers` actors and wait until they have loaded their models; returns the seconds it took.

        Optional: `run` starts actors itself. Benchmarks use this to time steady-state throughput only.
        """
        t0 = time.perf_counter()
        while len(self.slots) < self.config.workers:
            self._start_actor()
            self._warm_started += 1
        timeout = timeout_s if timeout_s is not None else self.config.startup_timeout_s
        for slot in self.slots:
            try:
                ray.get(slot.ready_ref, timeout=max(0.0, timeout - (time.perf_counter() - t0)))
            except GetTimeoutError as e:
                raise PoolError(f"actors not ready after {timeout:.0f}s") from e
            except RayError as e:
                raise PoolError(f"an actor died while loading its models: {_error_text(e)}") from e
            slot.ready = True
        return time.perf_counter() - t0

    # -- outcomes -------------------------------------------------------------------------------------------
    def _succeed(self, run: _RunState, slot: _Slot, task: ShardTask, result: dict[str, Any]) -> None:
        out = ShardOutcome(task, True, result["stats"], run.attempts[task] + 1, run.errors.get(task, []),
                           slot.serial, result["pid"], result["node"], result["process_seconds"],
                           result["cpu_seconds"], result["lease_seconds"])
        run.outcomes[task] = out
        if self.listener is not None:
            self.listener.on_shard(out)

    def _charge(self, run: _RunState, task: ShardTask, error: str, slot: _Slot | None = None) -> None:
        """Count one failed run of `task` (on `slot`); requeue it or, out of retries, record it as failed."""
        run.attempts[task] += 1
        if slot is not None:
            run.failed_on.setdefault(task, set()).add(slot.serial)
        run.errors.setdefault(task, []).append(error)
        if run.attempts[task] > self.config.max_retries:
            out = ShardOutcome(task, False, None, run.attempts[task], run.errors[task])
            run.outcomes[task] = out
            log.error("shard %s failed after %d attempts: %s", task.url, out.attempts, error)
            if self.listener is not None:
                self.listener.on_shard(out)
        else:
            log.warning("shard %s: attempt %d failed (%s); retrying", task.url, run.attempts[task], error)
            run.queue.append(task)
            if self.listener is not None:
                self.listener.on_retry(task, error)

    def _actor_died(self, run: _RunState, slot: _Slot, err: BaseException) -> None:
        """Collect what the dead actor finished; charge the shard it was running; requeue the rest for free."""
        text = _error_text(err)
        charged = False
        if slot.inflight:  # let the other refs of the dead actor resolve (results or errors)
            ray.wait([r for r, _ in slot.inflight], num_returns=len(slot.inflight), timeout=2.0)
        for ref, task in slot.inflight:
            try:
                self._succeed(run, slot, task, ray.get(ref, timeout=0))
                continue
            except RayError as e:  # (GetTimeoutError included)
                if isinstance(e, RayTaskError) and not isinstance(e, RayActorError):
                    self._charge(run, task, _error_text(e), slot)
                    continue
            if slot.ready and not charged:  # the oldest unfinished shard was the one running
                self._charge(run, task, f"actor died while running it: {text}", slot)
                charged = True
            else:
                run.queue.appendleft(task)
        slot.inflight.clear()
        self._remove(slot)
        if slot.ready:
            run.report.actors_died += 1
            log.warning("actor #%d died (%s); starting a replacement", slot.serial, text)
            return
        self._startup_failures += 1
        log.error("actor #%d died during setup (%d in a row): %s", slot.serial, self._startup_failures, text)
        if self._startup_failures >= self.config.max_startup_failures:
            raise PoolError(f"{self._startup_failures} actors in a row died while loading their models; "
                            f"last error: {text}")

    # -- live sample counts ---------------------------------------------------------------------------------
    def _count(self, slot: _Slot, count: int) -> None:
        if count > slot.samples_seen and self.listener is not None:
            self.listener.on_samples(count - slot.samples_seen)
            slot.samples_seen = count

    def _poll_progress(self) -> None:
        """Harvest finished `progress()` polls and send new ones every `poll_seconds` (never blocks)."""
        if self.listener is None:
            return
        for slot in self.slots:
            if slot.poll_ref is not None and ray.wait([slot.poll_ref], timeout=0)[0]:
                try:
                    self._count(slot, ray.get(slot.poll_ref))
                except RayError:
                    pass
                slot.poll_ref = None
        now = time.perf_counter()
        if now - self._last_poll >= self.config.poll_seconds:
            self._last_poll = now
            for slot in self.slots:
                if slot.ready and slot.inflight and slot.poll_ref is None:
                    slot.poll_ref = slot.handle.progress.remote()

    def _final_counts(self) -> None:
        """Last live-count update from every live actor, so the listener ends with the full sample count."""
        if self.listener is None:
            return
        slots = [s for s in self.slots if s.ready]
        for slot, ref in zip(slots, [s.handle.progress.remote() for s in slots]):
            try:
                self._count(slot, ray.get(ref, timeout=10))
            except RayError:
                continue

    # -- the loop -------------------------------------------------------------------------------------------
    def _recycle_and_refill(self, run: _RunState) -> None:
        """Kill drained actors that are due for recycling; keep `workers` actors while work remains."""
        for slot in [s for s in self.slots if s.retiring and not s.inflight]:
            log.info("recycling actor #%d after %d shards", slot.serial, slot.assigned)
            self._remove(slot)
            run.report.actors_recycled += 1
        pending = len(run.queue) + sum(len(s.inflight) for s in self.slots)
        while len(self.slots) < min(self.config.workers, pending):
            self._start_actor()
            run.report.actors_started += 1

    def _retire_faulty(self, run: _RunState, slot: _Slot, error: str) -> None:
        """Kill an actor whose device faulted; the shards queued behind the failed one go back for free."""
        for _, task in reversed(slot.inflight):
            run.queue.appendleft(task)
        slot.inflight.clear()
        self._remove(slot)
        run.report.actors_faulted += 1
        log.warning("actor #%d raised a device fault (%s); replacing it", slot.serial, error)

    @staticmethod
    def _next_task(run: _RunState, slot: _Slot, live: set[int]) -> ShardTask | None:
        """The first queued shard that has not failed on `slot` (unless it failed on every live actor)."""
        for i, task in enumerate(run.queue):
            tried = run.failed_on.get(task, set())
            if slot.serial not in tried or live <= tried:
                del run.queue[i]
                return task
        return None

    def _hand_out(self, run: _RunState) -> None:
        """Queue shards on actors, least-loaded first, at most `max_in_flight` each; mark actors due to retire.

        A retried shard goes to an actor it has not failed on, when there is one.
        """
        cfg = self.config
        live = {s.serial for s in self.slots}
        for slot in sorted(self.slots, key=lambda s: len(s.inflight)):
            while run.queue and not slot.retiring and len(slot.inflight) < cfg.max_in_flight:
                task = self._next_task(run, slot, live)
                if task is None:
                    break
                slot.inflight.append((slot.handle.process.remote(task, self.out_dir), task))
                slot.assigned += 1
                run.report.max_in_flight_seen = max(run.report.max_in_flight_seen, len(slot.inflight))
                if cfg.recycle_every and slot.assigned >= cfg.recycle_every:
                    slot.retiring = True

    def _route(self, run: _RunState, slot: _Slot, ref: Any) -> None:
        """Handle one finished ref: an actor became ready (or died starting), or a shard finished or failed."""
        if ref is slot.ready_ref:
            try:
                ray.get(ref)
            except RayError as e:
                self._actor_died(run, slot, e)
                return
            slot.ready = True
            self._startup_failures = 0
            run.first_ready = run.first_ready or time.perf_counter()
            return
        task = next(t for r, t in slot.inflight if r is ref)
        try:
            result = ray.get(ref)
        except RayActorError as e:
            self._actor_died(run, slot, e)
            return
        except RayTaskError as e:  # the processor raised; the actor is fine unless the error says otherwise
            slot.inflight = [(r, t) for r, t in slot.inflight if r is not ref]
            self._charge(run, task, _error_text(e), slot)
            if _retires_worker(e):
                self._retire_faulty(run, slot, _error_text(e))
            return
        except RayError as e:  # worker crashed, OOM kill, lost object: treat the actor as gone
            self._actor_died(run, slot, e)
            return
        slot.inflight = [(r, t) for r, t in slot.inflight if r is not ref]
        self._succeed(run, slot, task, result)

    def run(self, tasks: list[ShardTask]) -> PoolReport:
        """Process every task; returns one outcome per task (in input order). Raises `PoolError` if stuck."""
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"shard keys must be unique within a run; repeated: {dup[:5]}")
        cfg = self.config
        t_start = time.perf_counter()
        run = _RunState(deque(tasks), PoolReport(outcomes=[], actors_started=self._warm_started))
        self._warm_started = 0
        run.first_ready = t_start if any(s.ready for s in self.slots) else None
        try:
            while run.queue or any(s.inflight for s in self.slots):
                # 1. Actors: recycle drained ones that are due, start replacements while work remains.
                self._recycle_and_refill(run)
                # 2. Shards: hand out up to `max_in_flight` per actor.
                self._hand_out(run)
                # 3. Wait for the next result or readiness, then route it.
                watch = {s.ready_ref: s for s in self.slots if not s.ready}
                watch.update({ref: s for s in self.slots for ref, _ in s.inflight})
                done, _ = ray.wait(list(watch), num_returns=1, timeout=cfg.poll_seconds)
                for ref in done:
                    if watch[ref] in self.slots:  # (not removed while routing an earlier ref)
                        self._route(run, watch[ref], ref)
                # 4. Live sample counts; give up if no actor ever gets scheduled.
                self._poll_progress()
                if run.first_ready is None and time.perf_counter() - t_start > cfg.startup_timeout_s:
                    raise PoolError(f"no actor became ready within {cfg.startup_timeout_s:.0f}s; does the cluster "
                                    f"have {cfg.num_cpus} CPU / {cfg.num_gpus} GPU free per actor?")
            self._final_counts()
        finally:
            for slot in list(self.slots):
                self._remove(slot)
        report = run.report
        report.outcomes = [run.outcomes[t] for t in tasks]
        report.wall_seconds = time.perf_counter() - t_start
        report.startup_seconds = (run.first_ready or time.perf_counter()) - t_start
        return report
