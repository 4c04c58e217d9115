"""The batching engine: the one place that decodes. Every request, of one caller or of many, is a
:class:`Job` on it; each running job owns one sequence of a llama.cpp :class:`~edge_safe.llama.Context`.

On a small model a CPU decode step is bound by reading the weights, so decoding one token for each of
several sequences in one ``llama_decode`` costs little more than one. A composition is only a KV
prefix, so every sequence can have its own.

- A scheduler thread owns the context: ``n_parallel`` sequences, each with its own KV stream.
- At admission a job gets the free sequence that already holds the longest part of its own
  ``[BOS][mode][constraints] prompt`` (same composition, same leading prompt tokens: a conversation's
  next turn), keeps those cells and decodes only the rest; otherwise the composition's prefix is
  restored from the engine's snapshot LRU (a snapshot of one sequence restores into any) or built
  there once and snapshotted. A sequence only ever keeps cells that the new request would have
  computed itself, so no request sees another's.
- Deep control tokens: BOS and the composition's deep cells are written at position 0 (a state blob
  loaded into the sequence, made from this context's own BOS-only state, parsed once at start;
  ``kv_cells``); shallow vectors are decoded after them at 1.., so deep cells take no position and
  every stream has room for the bank's deep cells besides ``n_ctx`` positions. A cache layout
  ``kv_cells`` cannot write into (a quantized KV cache) fails the engine's creation.
- Every step builds one token batch: the next token of every running request first, then chunks of
  the prompts of newly admitted ones, up to ``n_batch`` rows; only a sequence's last row asks for
  logits, which go to the job's policy (:mod:`edge_safe.decode`). Requests past n wait in order.
- When a job is cancelled (``Job.close``, a client gone) or fails, its sequence is freed at the next
  step; a failed decode clears the sequences it touched.

llama.cpp's CPU logits move by ~0.01-0.6 with the shape of the batch a row is decoded in, so a
greedy reply can differ at a near-tie with the company it is decoded in; :meth:`Engine.together`
queues a set of requests atomically, so an evaluation batches the same way on every run.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from edge_safe import kv_cells
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.decode import Marker, Reload, Request, Resume, View
from edge_safe.llama import Context
from edge_safe.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4  # sequences decoded together on the server: 4 rows cost ~1.1x one on 2 cores
READY_CHUNK = 128  # rows per decode when laying out a next turn in advance (a request waits at most one)


class EngineClosedError(EdgeSafeError):
    """The engine was closed while the request waited or ran."""


class QueueFullError(EdgeSafeError):
    """More requests wait than the engine's ``max_queue``."""


_END = object()  # end of a job's piece stream


class Job:
    """One request in the engine. Iterate it for a reply's text pieces, or call :meth:`result` for the
    policy's value (the reply text, a margin, logits); :meth:`close` cancels it. ``stats`` is the
    request's own :class:`~edge_safe.decode.RequestStats`."""

    def __init__(self, engine: "Engine", req: Request, policy):
        self.engine, self.request, self.policy, self.stats = engine, req, policy, req.stats
        self.seq: int | None = None
        self.current = req  # the request whose cells the sequence holds (a Reload changes it)
        self.pending: list = []  # items to put into the sequence (token ids, Markers), from position `pos`
        self.prompt_left = 0  # of which prompt tokens (the rest: the reply's)
        self.pos = 0
        self.saved: tuple[bytes, tuple, int] | None = None  # (blob, held, pos) taken by Reload(save=True)
        self.cancelled = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False

    def __iter__(self) -> "Job":
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        item = self._pieces.get()
        if item is _END:
            self._ended = True
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item

    def put(self, piece: str) -> None:
        """Hand a text piece to the consumer (a reply policy's ``emit``)."""
        self._pieces.put(piece)

    def result(self, timeout: float | None = None):
        """The policy's value once the job is over (re-raises its error)."""
        if not self.done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.policy.value

    def close(self) -> None:
        """Cancel the request (a no-op once it is over); returns once its sequence is freed."""
        if not self.done.is_set():
            self.engine.cancel(self)
            if not self.engine.on_scheduler():
                self.done.wait()

    def finish(self, error: BaseException | None = None) -> None:
        """Mark the job over (the engine calls this once)."""
        if self.done.is_set():
            return
        self.error = error
        self.done.set()
        self._pieces.put(_END)


class Engine:
    """Decodes requests on ``n_parallel`` sequences of one context on ``model`` (see the module doc).

    ``bos_state`` is a callable checking a parsed BOS-only KV state against the bank's deep tokens
    (given when the bank has deep tokens; it raises when the cache layout cannot take them)."""

    def __init__(self, model, n_ctx: int, n_parallel: int = 1, *, n_batch: int = 512, n_threads: int | None = None,
                 extra_cells: int = 0, flash_attn: bool | None = None, kv_type: str | None = None,
                 prefix_cache_bytes: int = 64 << 20, max_queue: int | None = None,
                 check_bos_state: Callable[[kv_cells.SeqState], list[list[int]]] | None = None,
                 rope_bases: list[float] | None = None, view_n_ctx: int = 0):
        if not isinstance(n_parallel, int) or isinstance(n_parallel, bool) or n_parallel < 1:
            raise EdgeSafeError(f"parallel must be a whole number >= 1, got {n_parallel!r}")
        self.n_parallel, self.max_queue = n_parallel, max_queue
        self._rope_bases = rope_bases  # per layer: where deep cells are written after position 0
        self.ctx = Context(model, n_ctx, n_seq=n_parallel, n_batch=n_batch, n_threads=n_threads,
                           extra_cells=extra_cells, flash_attn=flash_attn, kv_type=kv_type)
        self.model, self.n_ctx = model, self.ctx.n_ctx
        # the view context: one short sequence where a policy's View (a conversation's last message read alone)
        # is decoded, so the sequences' own KV is never touched by it
        self.view_ctx: Context | None = None
        self._view_key: tuple | None = None  # the composition whose prefix the view sequence holds
        try:
            self._bos_state = self._parse_bos_state(self.ctx, check_bos_state) if check_bos_state else None
            if view_n_ctx:
                self.view_ctx = Context(model, view_n_ctx, n_seq=1, n_batch=n_batch, n_threads=n_threads,
                                        extra_cells=extra_cells, flash_attn=flash_attn, kv_type=kv_type)
                self._view_bos = (self._parse_bos_state(self.view_ctx, check_bos_state)
                                  if check_bos_state else None)
        except BaseException:
            self.ctx.close()
            if self.view_ctx is not None:
                self.view_ctx.close()
            raise
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.steps = 0  # decodes run (for tests and the bench)
        self._held: list[list | None] = [None] * n_parallel  # per sequence: the items it holds after BOS
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._readies: deque[Request] = deque(maxlen=n_parallel)  # next turns to lay out while idle
        self.readied = 0  # next turns laid out in advance (for tests and the bench)
        self._free = list(range(n_parallel))
        self._closing = False
        self._readying = False
        self._thread = threading.Thread(target=self._loop, name="edge-safe-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closing

    def on_scheduler(self) -> bool:
        """True in the scheduler thread (where waiting for a job would never end)."""
        return threading.current_thread() is self._thread

    def submit(self, req: Request, policy) -> Job:
        """Queue a prepared request with the policy that decodes it; the :class:`Job`."""
        job = Job(self, req, policy)
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is closed; create a new one")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + len(self._free):
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already (max_queue "
                                     f"{self.max_queue}); retry later")
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def ready(self, req: Request) -> None:
        """Lay out ``req`` (its items end with the control tokens' Marker: a conversation's next turn before
        its user message is known) in a free sequence while the engine is idle, so the next request that
        continues it decodes only its new message. Work for requests always comes first; a ready that a
        request interrupts leaves what it laid out so far, which is a true prefix like any other."""
        items = req.items
        if not items or not isinstance(items[-1], Marker):
            raise EdgeSafeError("Engine.ready: the request must end with its control tokens (a next turn's prefix)")
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is closed; create a new one")
            self._readies.append(req)
            self._cv.notify_all()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no request waits or runs and every queued :meth:`ready` is done (True), or ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while (self._waiting or self._running or self._readies or self._readying) and not self._closing:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def cancel(self, job: Job) -> None:
        """Cancel a job: a waiting one ends now, a running one at the scheduler's next step."""
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.finish()
            self._cv.notify_all()

    def forget(self) -> None:
        """Drop the conversations the sequences hold: the next requests restore their prefix snapshot
        and prefill their prompt (prefix snapshots are kept: ``prefix_cache.clear()`` drops them)."""
        with self._cv:
            for seq in self._free:
                self._held[seq] = None

    @contextlib.contextmanager
    def together(self) -> Iterator["Engine"]:
        """Queue several requests as one: the scheduler admits none of those submitted inside the block
        until it ends, so the same requests are batched the same way on every run, whatever the timing
        of the submitting thread. Do not wait for a result inside the block (it would never come)."""
        with self._cv:  # re-entrant (Condition's default RLock): submit takes it again
            yield self

    def close(self) -> None:
        """Stop the scheduler (running and waiting requests fail with EngineClosedError), free the context."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        if self._thread.is_alive() and not self.on_scheduler():
            self._thread.join()
        self.ctx.close()
        if self.view_ctx is not None:
            self.view_ctx.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._waiting or self._running or self._readies):
                        self._cv.wait()
                    if self._closing:
                        break
                    if self._readies and not (self._waiting or self._running):
                        req, self._readying = self._readies.popleft(), True
                        seq = self._pick_seq(req)
                    else:
                        req = None
                if req is not None:
                    try:
                        self._lay_out(seq, req)
                    finally:
                        with self._cv:
                            self._readying = False
                            self._free_seq(seq)
                            self._cv.notify_all()  # settle() waits for this
                    continue
                with self._cv:
                    for job in [j for j in self._running if j.cancelled]:
                        self._release(job)
                    admitted = []
                    while self._waiting and self._free:
                        job = self._waiting.popleft()
                        job.seq = self._pick_seq(job.request)
                        admitted.append(job)
                        self._running.append(job)
                for job in admitted:
                    self._admit(job)
                if self._running:
                    self._step()
        except BaseException as e:  # a bug or a native failure: fail every request rather than hang them
            log.exception("the engine's scheduler stopped")
            with self._cv:
                self._closing = True
            self._fail_all(e if isinstance(e, EdgeSafeError) else EdgeSafeError(f"the engine failed: {e!r}"))
            return
        self._fail_all(EngineClosedError("the engine was closed before this request finished"))

    def _lay_out(self, seq: int, req: Request) -> None:
        """A :meth:`ready`: bring ``seq`` to ``req``'s items (reusing what it holds, as a request would),
        in chunks of ``READY_CHUNK`` rows, stopping early when a request comes in."""
        job = Job(self, req, None)
        job.seq = seq
        try:
            self._place(job, req)
            while job.pending:
                if self._waiting or self._closing:
                    return
                if isinstance(job.pending[0], Marker):
                    self._write_marker(job)
                    continue
                take = min(_tokens_ahead(job.pending), READY_CHUNK)
                rows = job.pending[:take]
                self.ctx.decode_rows(rows, [seq] * take, range(job.pos, job.pos + take), [False] * take)
                self._held[seq].extend(rows)
                del job.pending[:take]
                job.pos += take
            self.readied += 1
        except Exception:  # noqa: BLE001 - a ready is an optimisation: drop the sequence's cells, go on
            log.exception("laying out a next turn in advance failed; the sequence is cleared")
            if not self.ctx.closed:
                self._drop(seq)

    def _pick_seq(self, req: Request) -> int:
        """The free sequence holding the longest part of the request (lowest id among equals)."""
        items = req.items

        def reuse(seq: int) -> int:
            held = self._held[seq]
            return _common_prefix(held, items) if held is not None else -1
        seq = max(self._free, key=lambda s: (reuse(s), -s))
        self._free.remove(seq)
        return seq

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            jobs = list(self._running) + list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            if job in self._running:
                self._release(job, error)
            else:
                job.finish(error)

    def _release(self, job: Job, error: BaseException | None = None) -> None:
        """End a running job: free its sequence (its cells stay, described by ``_held``), wake its consumer."""
        with self._cv:
            if job in self._running:
                self._running.remove(job)
            if job.seq is not None:
                if error is not None and not self.ctx.closed:
                    self._drop(job.seq)
                self._free_seq(job.seq)
            job.seq = None
            self._cv.notify_all()  # settle() waits for this
        job.finish(error)

    def _free_seq(self, seq: int) -> None:
        """Put ``seq`` back among the free sequences (its cells stay, described by ``_held``); under ``_cv``."""
        self._free.append(seq)
        self._free.sort()

    def _drop(self, seq: int) -> None:
        self.ctx.seq_rm(seq)
        self._held[seq] = None

    def _parse_bos_state(self, ctx: Context, check) -> tuple[kv_cells.SeqState, list[list[int]]]:
        """[BOS] decoded into sequence 0 of ``ctx``, its state parsed and checked (``check`` gives the layer map
        of its sections), the sequence cleared. The deep cells are written into a state of the context's
        own, whose blobs list a stream per sequence."""
        ctx.decode_rows([self.model.bos], [0], [0], [False])
        try:
            blob = ctx.save_seq(0)
        finally:
            ctx.seq_rm(0)
        state = kv_cells.parse(blob)
        return state, check(state)

    def _deep_blob(self, req: Request, bos_state=None) -> bytes:
        """The blob of [BOS] + the request's deep cells, all at position 0 (in the main context's layout, or
        ``bos_state``'s)."""
        state, groups = bos_state or self._bos_state
        keys, values = req.deep
        seq_id = state.sections[0].seq_ids[0][0]  # llama.cpp loads a blob into the sequence it is given
        return kv_cells.serialise(kv_cells.with_cells(state, keys, values, groups, pos=0, seq_id=seq_id))

    def _swa_lost(self, seq: int, keep: int) -> bool:
        """Whether cutting ``seq`` back to positions < ``keep`` would leave its sliding-window layers without
        cells the next position attends to: llama.cpp drops a sequence's cells older than its last n_swa
        positions from those layers, so a long sequence cut back to a short common prefix has none left there
        (its full-attention layers still do). llama.cpp's server makes the same check before reusing a prefix
        (one position stricter)."""
        n_swa = self.model.n_swa
        # the token at position `keep` attends in those layers to positions keep - n_swa + 1 .. keep
        # (llama.cpp masks a cell once the distance reaches n_swa), all of which must still be held
        return bool(n_swa) and self.ctx.pos_range(seq)[0] > max(0, keep - n_swa + 1)

    def _place(self, job: Job, req: Request) -> None:
        """Bring the job's sequence to the longest part of the request's items it can keep or restore with
        the fewest decodes; queue the rest (tokens, and the control tokens' Marker where it is not yet in)."""
        ctx, seq, st = self.ctx, job.seq, req.stats
        timed = _Timer(st)
        items, held = req.items, self._held[seq]
        # >= 1 token decoded for the first reply token's logits, more where the policy reads rows before it
        need = 1 + max(getattr(job.policy, "earlier", ()), default=0)
        common = 0 if held is None else max(0, min(_common_prefix(held, items), len(items) - need))
        if 0 < common < len(held) and isinstance(held[common], Marker):
            common -= 1  # its deep cells share the previous item's position: drop that item too
        if common and self._swa_lost(seq, _position(items, common)):
            common = 0  # the shorter prefix's sliding-window cells are gone: rebuild it, never decode after a hole
        if common:
            with timed("truncate"):
                kept = ctx.truncate(_position(items, common), seq)
            st.prefix_source = "reused" if kept else ""
            common = common if kept else 0
        if not common:
            self._held[seq] = None
            first = items[0] if isinstance(items[0], Marker) else None
            key = first.key if first else ()
            blob = self.prefix_cache.get(key)
            if blob is not None:
                with timed("restore"):
                    ctx.load_seq(blob, seq)
                st.prefix_source = "cache"
            else:
                if first and req.deep is not None:  # BOS + the deep cells at position 0, written, not decoded
                    with timed("kv_write"):
                        ctx.load_seq(self._deep_blob(req), seq)
                else:
                    with timed("bos"):
                        ctx.seq_rm(seq)
                        ctx.decode_rows([self.model.bos], [seq], [0], [False])
                if first and len(req.vectors):
                    with timed("vectors"):
                        ctx.decode_embeddings(req.vectors, 1, seq=seq)
                if self.prefix_cache.max_bytes:
                    with timed("snapshot"):
                        self.prefix_cache.put(key, ctx.save_seq(seq))
                st.prefix_source = "built"
            common = 1 if first else 0
        # The sequence now holds a verified prefix: record it before decoding more, so a cancel or a
        # failed decode leaves bookkeeping that is still true.
        self._held[seq] = list(items[:common])
        job.current, job.pending, job.pos = req, list(items[common:]), _position(items, common)
        job.prompt_left = st.prefilled_tokens = sum(not isinstance(i, Marker) for i in job.pending)

    def _write_marker(self, job: Job) -> None:
        """Put the control tokens of the job's next item into its sequence: deep cells at the position of
        the last item (keys rotated there), shallow vectors after it."""
        marker, req, ctx, seq = job.pending.pop(0), job.current, self.ctx, job.seq
        timed = _Timer(req.stats)
        at = job.pos - 1  # the position of the item before: where the cells sit
        if req.deep is not None:
            with timed("kv_write"):
                keys, values = req.deep
                rotated = kv_cells.rope_neox(keys, at, self._rope_bases)
                if (copies := req.copies_at(at)) > 1:  # identical rows at one position: + ln(copies) to their logits
                    rotated, values = np.concatenate([rotated] * copies), np.concatenate([values] * copies)
                    req.stats.deep_copies = max(req.stats.deep_copies, copies)
                # the sequence's state, the cells spliced in where it lies (the blob's own sequence id)
                groups = self._bos_state[1]
                spare = kv_cells.added_bytes(len(rotated), len(groups), *rotated.shape[1:], values.shape[2])
                buf, size = ctx.save_seq_scratch(seq, spare)
                size = kv_cells.append_cells_in_place(buf, size, rotated, values, groups, pos=at)
                ctx.load_seq(buf[:size], seq)
        if marker.width:
            with timed("vectors"):
                ctx.decode_embeddings(req.vectors, job.pos, seq=seq)
        self._held[seq].append(marker)
        job.pos += marker.width

    def _admit(self, job: Job) -> None:
        try:
            self._place(job, job.request)
        except Exception as e:  # this request fails, the others go on
            self._release(job, e)

    def _step(self) -> None:
        """One decode: every running job's next token, then prompt chunks, up to n_batch rows."""
        tokens, seqs, pos, want, fed = [], [], [], [], []  # fed: (job, rows taken, row of its logits or -1)
        budget = self.ctx.n_batch
        jobs = [j for j in self._running if j.pending and not j.cancelled]
        for job in [j for j in jobs if isinstance(j.pending[0], Marker)]:
            try:
                self._write_marker(job)  # this sequence alone, before the step's decode
            except Exception as e:
                self._release(job, e)
        jobs = [j for j in jobs if j.seq is not None and j.pending]
        jobs.sort(key=lambda j: len(j.pending) > 1)  # decoding rows first, then prompts (stable)
        earlier = []  # (job, offset, row): rows before a prompt's last one whose logits its policy reads
        for job in jobs:
            take = min(_tokens_ahead(job.pending), budget - len(tokens))
            if take <= 0:
                break
            first = len(tokens)
            tokens += job.pending[:take]
            seqs += [job.seq] * take
            pos += range(job.pos, job.pos + take)
            last = take == len(job.pending)  # (a Marker after these rows waits for the next step)
            want += [False] * (take - 1) + [last]
            back = getattr(job.policy, "earlier", ()) if job.prompt_left > 0 else ()
            if back:  # rows counted in tokens back from the prompt's last one (a Marker is no row)
                at = _token_rows_back(job.pending, max(back))
                for k in back:
                    if k < len(at) and at[k] < take:
                        want[first + at[k]] = True
                        earlier.append((job, k, first + at[k]))
            fed.append((job, take, len(tokens) - 1 if last else -1))
        if not tokens:
            return
        t0 = time.perf_counter()
        try:
            self.ctx.decode_rows(tokens, seqs, pos, want)
        except EdgeSafeError as e:
            for job, _, _ in fed:
                self._release(job, e)
            return
        t1 = time.perf_counter()
        self.steps += 1
        for job, k, row in earlier:
            job.policy.take_earlier(k, np.array(self.ctx.logits(row)))
        reloads: list[tuple[Job, Request]] = []
        for job, take, row in fed:
            st = job.current.stats
            prompt = job.prompt_left > 0
            st.add_step("prompt" if prompt else "decode", t1 - t0)
            job.prompt_left = max(0, job.prompt_left - take)
            if prompt and row >= 0:
                st.t_prefilled = t1
            self._held[job.seq].extend(job.pending[:take])
            del job.pending[:take]
            job.pos += take
            if row >= 0:
                self._feed(job, self.ctx.logits(row), reloads)
        # Only now, once every row's logits were read: building a prefix decodes into the context, which
        # would overwrite the logits of the rows not yet fed.
        for job, req in reloads:
            try:
                self._place(job, req)
            except Exception as e:
                self._release(job, e)

    def _feed(self, job: Job, logits: np.ndarray, reloads: list) -> None:
        """Hand the job's policy its logits and carry out what it asks for (a :class:`Reload` is added to
        ``reloads``, placed after the step's last row was fed)."""
        try:
            nxt = job.policy.feed(logits, job.pos)
            while isinstance(nxt, View):
                nxt = self._read_view(job, nxt.request)
            if isinstance(nxt, Reload):
                if nxt.save:
                    job.saved = (self.ctx.save_seq(job.seq), self._held[job.seq], job.pos)
                reloads.append((job, nxt.request))
                return
            if isinstance(nxt, Resume):
                blob, held, job.pos = job.saved
                self.ctx.load_seq(blob, job.seq)
                self._held[job.seq], job.current, job.saved = held, job.request, None
                nxt = nxt.token
        except Exception as e:  # e.g. an `until` callback that raised: this request fails, the others go on
            self._release(job, e)
            return
        if nxt is None or job.cancelled:
            self._release(job)
        else:
            job.pending = [nxt]

    def _read_view(self, job: Job, req: Request):
        """A :class:`View`: ``req`` (its control tokens with BOS, a short prompt) decoded in the view context,
        its logits fed to ``job.policy.view_feed`` (which may ask for one more token there, e.g. a blank one)
        until that returns None; then ``job.policy.after_view()`` gives the job's next step. The view sequence
        keeps its composition's prefix, so the next view under it decodes only its prompt."""
        ctx = self.view_ctx
        if ctx is None:
            raise EdgeSafeError("a View needs the engine's view context (Engine(view_n_ctx=...))")
        items = req.items
        if req.key and not isinstance(items[0], Marker) or any(isinstance(i, Marker) for i in items[1:]):
            raise EdgeSafeError("a View's control tokens must sit with BOS (a short last message)")
        tokens = [i for i in items if not isinstance(i, Marker)]
        pos = 1 + len(req.vectors)
        if pos + len(tokens) + 8 > ctx.n_ctx:
            raise EdgeSafeError(f"a View of {len(tokens)} tokens does not fit the view context ({ctx.n_ctx})")
        with _Timer(job.current.stats)("view"):
            if self._view_key != req.key:
                self._view_key = None
                ctx.seq_rm(0)
                if req.key and req.deep is not None:
                    ctx.load_seq(self._deep_blob(req, self._view_bos), 0)
                else:
                    ctx.decode_rows([self.model.bos], [0], [0], [False])
                if len(req.vectors):
                    ctx.decode_embeddings(req.vectors, 1, seq=0)
                self._view_key = req.key
            elif not ctx.truncate(pos, 0):
                self._view_key = None
                raise EdgeSafeError("llama.cpp could not cut the view sequence back to its prefix")
            back = [k for k in getattr(job.policy, "earlier", ()) if k < len(tokens)]
            if back:  # the tail with the rows the policy reads before the last one
                n = max(back) + 1
                if len(tokens) > n:
                    ctx.decode_tokens(tokens[:-n], pos, want_logits=False, seq=0)
                ctx.decode_rows(tokens[-n:], [0] * n, range(pos + len(tokens) - n, pos + len(tokens)),
                                [i == n - 1 or n - 1 - i in back for i in range(n)])
                for k in back:
                    job.policy.take_earlier(k, np.array(ctx.logits(n - 1 - k)))
            else:
                ctx.decode_tokens(tokens, pos, want_logits=True, seq=0)
            pos += len(tokens)
            while (tok := job.policy.view_feed(ctx.logits())) is not None:
                ctx.decode_rows([tok], [0], [pos], [True])
                pos += 1
        return job.policy.after_view()


class _Timer:
    """``with timer("name"):`` adds the block's seconds to a request's ``stats.steps``."""

    def __init__(self, stats):
        self.stats = stats

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats.add_step(name, time.perf_counter() - t0)


def _position(items: list, n: int) -> int:
    """The position of ``items[n]`` (BOS is at 0): one per token, a Marker's width for its vectors."""
    return 1 + sum(i.width if isinstance(i, Marker) else 1 for i in items[:n])


def _token_rows_back(pending: list, n: int) -> list[int]:
    """Indices into ``pending`` of its last token, the token before it, ... (``n`` + 1 at most; Markers skipped)."""
    out = []
    for j in range(len(pending) - 1, -1, -1):
        if not isinstance(pending[j], Marker):
            out.append(j)
            if len(out) > n:
                break
    return out


def _tokens_ahead(pending: list) -> int:
    """How many of the pending items are tokens before the next Marker."""
    for n, item in enumerate(pending):
        if isinstance(item, Marker):
            return n
    return len(pending)


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
