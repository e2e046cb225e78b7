"""The decoding side of the server: one thread owns the model and runs every request.

Requests (`Job`s) wait in a FIFO queue for one of `max_concurrency` slots; the worker
thread advances every job in a slot by one step at a time, so every client streams
while others run. Two ways to step them:

- batched (the default, `batched=True`): the jobs share one target forward per step
  (`runtime.batchdecode.BatchDecoder`: each job a slot of one slot KV cache; requests join
  and leave between steps; a prompt is prefilled in chunks of `prefill_chunk` tokens, one
  chunk per step, next to the others' decode rows, so a long prompt never stalls the
  other streams for longer than one chunk). A job gets its solo tokens up to the float
  rounding of the batched forward's shapes (see that module and docs/serving.md);
  `batch_policy` decides each step's drafts for all jobs at once (load-aware speculation).
- one at a time (`batched=False`, `specflash serve --exact`): each job steps in its own
  target forward, round-robin, with its own `SpeculativeDecoder` and its own shallow copy
  of the proposer (the drafter's weights are shared, the per-generation state is rebuilt
  by the proposer's `reset`). No two jobs share a forward, so each gets exactly its solo
  tokens; a prompt is prefilled whole in one step.

A draft-tree policy (`--tree`) always steps one at a time (the batched decoder verifies
linear blocks).

Text is assembled here (`TextAssembler`): deltas hold back an incomplete UTF-8
character and any tail that could begin a stop string; the first stop string ends
the job. A job whose client went away is cancelled between two steps, which frees
its slot at once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ..runtime.batchdecode import BatchDecoder
from ..runtime.batchpolicy import LoadAwarePolicy
from ..runtime.blockpolicy import AutoBlock
from ..runtime.config import DecodeConfig
from ..runtime.decode import SpeculativeDecoder
from ..errors import SpecflashError
from ..runtime.metrics import SpecStats
from ..runtime.pipeline import Pipeline
from ..runtime.treepolicy import is_tree_policy
from .stats import ServerMetrics

logger = logging.getLogger("specflash.serve")


def _private_copy(tokenizer):
    """A copy of `tokenizer` that shares no state with it (None when it cannot be copied:
    the caller then shares the original under the lock)."""
    if tokenizer is None:
        return None
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is still usable
        logger.warning("could not copy the tokenizer; decoding shares it with request tokenization")
        return None


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class TextAssembler:
    """Token ids in, text deltas out, cut at the first stop string.

    `push(tokens, final)` returns the new text that is safe to send: it never sends
    an incomplete UTF-8 character (decoded as U+FFFD) nor a tail that may turn out
    to be the start of a stop string, unless `final`. After a stop string is found,
    `stopped` is True and `text` ends just before it.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = []
        self.text = ""  # the text sent so far
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def push(self, tokens: Sequence[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.tokens.extend(int(t) for t in tokens)
        full = self._decode(self.tokens)
        if not final:
            full = full.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
        if len(full) < len(self.text):
            return ""
        if self.stop:
            start = max(0, len(self.text) - self._longest + 1)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = max(min(hits), len(self.text))
                self.stopped = True
                delta, self.text = full[len(self.text):end], full[:end]
                return delta
        end = len(full) if final else len(full) - self._held_back(full)
        end = max(end, len(self.text))
        delta, self.text = full[len(self.text):end], full[:end]
        return delta


@dataclass
class Event:
    """What a job reports to its client after a step."""

    text: str  # new text (may be empty)
    finish_reason: str | None = None  # "stop", "length" when done; "abort" when cancelled
    error: str | None = None  # set when the job failed
    status: int = 500  # HTTP status of `error`


@dataclass(eq=False)  # jobs are compared by identity (two jobs may hold equal requests)
class Job:
    """One generation request on its way through the engine."""

    prompt_ids: list[int]
    config: DecodeConfig
    stop: tuple[str, ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    created: float = field(default_factory=time.perf_counter)
    # Filled in by the engine thread.
    stats: SpecStats = field(default_factory=SpecStats)
    num_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    text: str = ""

    def __post_init__(self) -> None:
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue[Event] | None = asyncio.Queue() if self.loop is not None else None
        self._steps = None
        self._sequence = None  # its BatchSequence when the engine runs batched
        self._assembler: TextAssembler | None = None
        self.on_event: Callable[[Event], None] | None = None  # for callers without an event loop

    @property
    def tau(self) -> float | None:
        return self.stats.tau

    # Derived from the decoder's own SpecStats (one record per verify step).
    @property
    def verify_steps(self) -> int:
        return self.stats.num_steps

    @property
    def drafted(self) -> int:
        return sum(self.stats.drafted_per_position)

    @property
    def accepted(self) -> int:
        return sum(self.stats.accepted_per_position)

    def deliver(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if self._queue is None or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The job's events, ending with the one that has a finish_reason or an error."""
        assert self._queue is not None, "create the Job with loop=asyncio.get_running_loop()"
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None or event.error is not None:
                return


class Engine:
    """Owns the pipeline; runs jobs on one worker thread (see the module docstring)."""

    def __init__(self, pipe: Pipeline, max_concurrency: int = 8, max_queue: int = 256,
                 metrics: ServerMetrics | None = None, torch_threads: int | None = None,
                 batched: bool = True, prefill_chunk: int = 128, batch_policy=None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 (got {max_concurrency})")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (got {max_queue})")
        self.pipe = pipe
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else ServerMetrics(pipe.block_size)
        self.torch_threads = torch_threads
        # Fast tokenizers must not be used from two threads at once. Requests are tokenized
        # on worker threads of the HTTP server, one at a time under this lock; the decoding
        # thread decodes with its own copy, so a long prompt never holds up other streams.
        self.tokenizer_lock = threading.Lock()
        self._decode_tokenizer = _private_copy(getattr(pipe.target, "tokenizer", None))
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.why_one_at_a_time = "" if batched else "--exact"  # why the engine does not batch
        self._batch = self._batch_decoder(prefill_chunk, batch_policy) if batched else None

    def _batch_decoder(self, prefill_chunk: int, batch_policy) -> BatchDecoder | None:
        """The batched decoder over `max_concurrency` slots (None: a policy it cannot run)."""
        base = self.pipe.decoder
        if is_tree_policy(base.policy):
            self.why_one_at_a_time = "draft trees step one request at a time"
            return None
        # Row invariance is checked under the decoding thread's torch threads (BLAS blockings
        # depend on them); the batched decoder then turns it on.
        base.target.enable_row_invariance(self.torch_threads)
        try:
            decoder = BatchDecoder(base.target, base.proposer, base.block_size, base.policy, batch_policy,
                                   max_slots=self.max_concurrency, prefill_chunk=prefill_chunk)
            if batch_policy is None:
                decoder.batch_policy = self._load_aware_policy(decoder.row_invariant) or decoder.batch_policy
            return decoder
        except SpecflashError as exc:
            logger.warning("stepping requests one at a time: %s", exc)
            self.why_one_at_a_time = str(exc)
            return None

    def _load_aware_policy(self, row_invariant: bool) -> LoadAwarePolicy | None:
        """With `--block-size auto` and a proposer: load-aware speculation over the batched
        forward costs of this machine (measured once, cached); else None (each sequence's
        own block policy)."""
        base = self.pipe.decoder
        if base.proposer is None or not isinstance(base.policy, AutoBlock):
            return None
        from ..perf.measure import load_or_measure_batch

        costs = load_or_measure_batch(base.target, base.proposer, max_rows=self.max_concurrency,
                                      max_tokens=base.block_size, log=logger.warning, row_invariant=row_invariant)
        return LoadAwarePolicy(costs, base.policy.costs, base.policy.max_drafts)

    @property
    def batched(self) -> bool:
        return self._batch is not None

    def describe(self) -> str:
        """How requests are stepped, for the startup line."""
        if self._batch is not None:
            return (f"batched: up to {self.max_concurrency} requests per forward, prompts in chunks of "
                    f"{self._batch.prefill_chunk}, drafts by {self._batch.batch_policy.name}, "
                    f"{'row-invariant' if self._batch.row_invariant else 'not row-invariant'}")
        return f"one request per forward ({self.why_one_at_a_time})"

    # --------------------------------------------------------------- control
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specflash-decode", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
        for job in pending:
            self._close(job)
            self._finish(job, "error", Event("", error="the server is shutting down", status=503))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) + len(self._active) >= self.max_queue + self.max_concurrency:
                raise QueueFullError(f"{len(self._active)} requests running and {len(self._waiting)} waiting")
            self._waiting.append(job)
            self._update_gauges()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Ask for `job` to end (its client went away); its slot frees before the next step."""
        if job.finished_at is not None:
            return
        job.cancelled.set()
        with self._cond:
            self._cond.notify()

    def decode_text(self, ids: list[int]) -> str:
        """Token ids -> text, as `target.decode` does; for the decoding thread only."""
        if self._decode_tokenizer is not None:
            return self._decode_tokenizer.decode(ids, skip_special_tokens=True)
        with self.tokenizer_lock:
            return self.pipe.target.decode(ids)

    # ----------------------------------------------------------------- work
    def _loop(self) -> None:
        if self.torch_threads:
            # Leave a core to the HTTP event loop: OpenMP workers that spin while the loop
            # needs the CPU slow decoding down many times over (measured on 2 cores).
            import torch

            torch.set_num_threads(self.torch_threads)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
            self.run_once()

    def run_once(self) -> bool:
        """Admit waiting jobs into free slots, then advance every running job one step.
        Returns False when there was nothing to do."""
        with self._cond:
            while self._waiting and len(self._active) < self.max_concurrency:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self._finish(job, "abort", Event("", finish_reason="abort"))
                    continue
                self._active.append(job)
            active = list(self._active)
            self._update_gauges()
        if self._batch is not None:
            self._advance_batch(active)
            return bool(active)
        for job in active:
            self._advance(job)
        return bool(active)

    def _advance_batch(self, active: list[Job]) -> None:
        """One batched step for every running job: new jobs join the batch (their prompts
        prefill in chunks from this step on), cancelled ones leave it first."""
        batch = self._batch
        stepping: dict[int, Job] = {}
        for job in active:
            if job.cancelled.is_set():
                self._close(job)
                self._retire(job, "abort", Event("", finish_reason="abort"))
                continue
            if job._sequence is None:
                job._assembler = TextAssembler(self.decode_text, job.stop)
                try:
                    job._sequence = batch.add(job.prompt_ids, job.config)
                except SpecflashError as exc:
                    self._retire(job, "error", Event("", error=str(exc), status=400))
                    continue
                job.stats = job._sequence.stats
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))
            stepping[id(job._sequence)] = job
        if not stepping:
            return
        try:
            events = batch.step()
        except Exception as exc:  # noqa: BLE001 - a bug fails the step's requests, not the server
            if isinstance(exc, SpecflashError):
                error, status = str(exc), 400
            else:
                logger.exception("batched step failed")
                error, status = f"internal error: {type(exc).__name__}: {exc}", 500
            for job in stepping.values():
                self._close(job)
                self._retire(job, "error", Event("", error=error, status=status))
            return
        for rows, tokens in batch.last_forwards:
            self.metrics.record_forward(rows, tokens)
        for event in events:
            job = stepping[id(event.sequence)]
            self._deliver(job, event.step, verify=job.first_token_at is not None)

    def _new_decoder(self) -> SpeculativeDecoder:
        base = self.pipe.decoder
        proposer = copy.copy(base.proposer) if base.proposer is not None else None
        return SpeculativeDecoder(base.target, proposer, base.block_size, base.policy)

    def _advance(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._close(job)
            self._retire(job, "abort", Event("", finish_reason="abort"))
            return
        try:
            if job._steps is None:
                job._assembler = TextAssembler(self.decode_text, job.stop)
                job._steps = self._new_decoder().steps(job.prompt_ids, job.config, job.stats)
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))
                verify = False
            else:
                verify = True
            step = next(job._steps)
        except SpecflashError as exc:  # a request the checks before the queue let through
            self._close(job)
            self._retire(job, "error", Event("", error=str(exc), status=400))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail one request, not the server
            logger.exception("generation failed")
            self._close(job)
            self._retire(job, "error", Event("", error=f"internal error: {type(exc).__name__}: {exc}", status=500))
            return
        # One job per target forward: the prefill computes the prompt, a verify step the
        # anchor and the drafts it checks.
        self.metrics.record_forward(1, 1 + step.num_drafted if verify else len(job.prompt_ids))
        self._deliver(job, step, verify)

    def _deliver(self, job: Job, step, verify: bool) -> None:
        """Count a job's step, send its text, retire the job when the step ended it."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
        job.num_tokens += len(step.tokens)
        self.metrics.record_step(step.num_drafted, step.num_accepted, len(step.tokens), verify)
        assembler = job._assembler
        delta = assembler.push(step.tokens, final=step.finish_reason is not None)
        job.text = assembler.text
        reason = "stop" if assembler.stopped else step.finish_reason
        if reason is None:
            job.deliver(Event(delta))
            return
        self._close(job)
        self._retire(job, reason, Event(delta, finish_reason=reason))

    def _close(self, job: Job) -> None:
        if job._sequence is not None:  # batched: leave the batch (a no-op once it has finished)
            if self._batch is not None:
                self._batch.cancel(job._sequence)
            job._sequence = None
        if job._steps is not None:
            try:
                job._steps.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing a generation failed")
            job._steps = None

    def _retire(self, job: Job, reason: str, event: Event | None) -> None:
        with self._cond:
            if job in self._active:
                self._active.remove(job)
            self._update_gauges()
        self._finish(job, reason, event)

    def _finish(self, job: Job, reason: str, event: Event | None) -> None:
        job.finished_at = time.perf_counter()
        job.finish_reason = reason
        m = self.metrics
        m.requests_finished.labels(finish_reason=reason).inc()
        if reason in ("stop", "length") and job.first_token_at is not None:
            m.time_to_first_token.observe(job.first_token_at - job.created)
            if job.num_tokens > 1:
                m.time_per_output_token.observe((job.finished_at - job.first_token_at) / (job.num_tokens - 1))
            m.request_latency.observe(job.finished_at - job.created)
        if event is not None:
            job.deliver(event)

    def _update_gauges(self) -> None:
        self.metrics.requests_running.set(len(self._active))
        self.metrics.requests_waiting.set(len(self._waiting))
