"""Continuous batching: several requests decoded together, each sequence with its own composition.

    engine = Engine(es, n_parallel=4)          # a second llama.cpp context on es's model
    reply = engine.chat(messages, tokens="minors,eu")              # blocks; as EdgeSafe.chat
    for chunk in engine.chat(messages, tokens="eu", stream=True): ...
    job = engine.submit(messages, tokens="minors")                 # a Job: iterate its pieces
    margins = [engine.refusal_margin(m, tokens=t, wait=False) for m, t in cases]   # Jobs
    values = [j.result() for j in margins]

On a small model a CPU decode step is bound by reading the weights, so decoding one token for
each of several sequences in one ``llama_decode`` costs little more than one. A composition is
only a KV prefix, so every sequence can have its own.

- A scheduler thread owns the :class:`~edge_safe.llama.SeqContext`: n sequences, each with its
  own KV stream (``kv_unified=False``). One shared stream was faster (4 clients: 2.17x one client's
  throughput against 1.83x, on 2 busy cores: llama.cpp splits a batch that mixes decode rows and a
  prompt into several micro-batches per stream) but gave wrong replies in the 500-request load
  test (``"10... a"`` for ``"Peru is a"``, no near-tie), so it is not used. A request holds one
  sequence id from admission to its end; at admission its prefix
  ``[BOS][mode][constraints]`` is restored from the engine's snapshot LRU (a snapshot taken from
  one sequence restores into any) or built in that sequence and snapshotted.
- Deep control tokens are built as ``EdgeSafe`` builds them: BOS and the composition's deep cells
  written at position 0 (a state blob loaded into the sequence), then its shallow vectors decoded
  at 1.., so deep cells take no position and every stream has room for the bank's deep cells
  besides ``n_ctx`` positions. The blob is made from this context's own BOS-only state, parsed
  once at start (its blobs list a stream per sequence; ``kv_cells``); a cache layout it cannot
  write into (a quantized KV cache) fails the engine's creation.
- Every step builds one token batch: the next token of every running request first, then chunks
  of the prompts of newly admitted ones, up to ``n_batch`` rows; only a sequence's last row asks
  for logits. Requests past n wait in order.
- A request's decoding state travels with it (:class:`_Reply`: sampling, stop strings,
  ``strictness``, the exact-refusal guide, the stream filter), fed one logits row per step; the
  logic is ``EdgeSafe._generate``'s, step by step. Probes use the same path
  (:class:`_Margin`, :class:`_Logits`, :class:`_Forced`) so evaluations decide many cases at once.
- When a request ends, is cancelled (``Job.close``, a client gone) or fails, its sequence's cells
  are removed (``seq_rm``) before the id is reused, so nothing of one request is visible to the next.

Greedy replies equal ``EdgeSafe.generate``'s (tests/test_engine.py): llama.cpp's CPU logits can
move by ~0.01-0.1 with batch composition, so where the greedy token wins by less than a quarter
logit (a near-tie) the continuation may differ; everything before is the same.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from typing import Callable, Iterator, Sequence

import numpy as np

from edge_safe.llama import SeqContext
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.prefix_cache import PrefixCache
from edge_safe.refusals import RefusalGuide, opener_margin
from edge_safe.runtime import EdgeSafe, Messages, RequestStats, _Request, _StopFilter, _usage
from edge_safe.sampling import check_sampling, sample

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4  # sequences decoded together (server --parallel): 4 rows cost ~1.1x one on 2 cores


class EngineClosedError(EdgeSafeError):
    """The engine was closed while the request waited or ran."""


_END = object()  # end of a job's piece stream


def _as_messages(messages: Messages | str) -> Messages:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


class _Reply:
    """One generation, fed one logits row per step: ``EdgeSafe._generate``'s loop body as a state machine."""

    def __init__(self, req: _Request, ctx: SeqContext, n_ctx: int, max_tokens: int, temperature: float,
                 top_p: float, rng: np.random.Generator, choose: Callable[[list[str]], str] | None,
                 emit: Callable[[str], None], until: Callable[[str], bool] | None = None):
        self.req, self.st, self.ctx, self.n_ctx = req, req.stats, ctx, n_ctx
        self.max_tokens, self.temperature, self.top_p, self.rng = max_tokens, temperature, top_p, rng
        self.out = _StopFilter(req.stops)
        self.biased = bool(req.openers)  # until the reply's first visible token
        self.guide = RefusalGuide(req.refusals, choose=choose) if req.refusals else None
        self.st.finish_reason = "length"
        self.i, self.t_first = 0, None
        self._emit, self.until, self.text, self.halted = emit, until, "", False
        self.value: str | None = None

    def emit(self, piece: str) -> None:
        if piece and not self.halted:
            self.text += piece
            self._emit(piece)
            if self.until is not None and self.until(self.text):
                self.halted = True  # the caller has what it needs: stop here, no tail

    def feed(self, logits: np.ndarray, pos: int) -> int | None:
        """Choose the token after ``logits``; the token to decode at ``pos`` next, or None when the reply is over."""
        req, st, guide, ctx = self.req, self.st, self.guide, self.ctx
        if self.biased:
            logits = logits.copy()  # llama.cpp's buffer stays as decoded
            logits[req.openers] += req.strictness
        if guide is not None:
            logits = guide.constrain(logits)
        tok = sample(logits, self.temperature, self.top_p, self.rng)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            st.ttft_s = self.t_first - req.t_call
        if ctx.llm.is_eog(tok):
            st.finish_reason = "stop"
            return self._end()
        st.completion_tokens += 1
        raw = ctx.token_to_piece(tok)
        visible = bool(raw.strip())
        self.biased = self.biased and not visible
        piece, stopped = self.out.feed(raw)
        self.emit(piece)
        if guide is not None and guide.step(tok, visible):
            st.refusal, stopped = guide.refusal, True
        rest = guide.remaining() if guide is not None and not stopped else None
        if rest is not None:  # one refusal left: written out, no decoding needed
            room = self.max_tokens - 1 - self.i
            for t in rest[:room]:
                st.completion_tokens += 1
                self.emit(self.out.feed(ctx.token_to_piece(t))[0])
            if len(rest) <= room:
                st.refusal, st.finish_reason = guide.refusal, "stop"
            return self._end()
        if stopped:
            st.finish_reason = "stop"
            return self._end()
        if self.halted or self.i == self.max_tokens - 1 or pos >= self.n_ctx:
            return self._end()
        self.i += 1
        return tok

    def _end(self) -> None:
        if not self.halted:
            self.emit(self.out.finish())
        self.st.decode_s = time.perf_counter() - (self.t_first or time.perf_counter())
        self.value = self.text
        return None


class _Margin:
    """``EdgeSafe.refusal_margin`` as a probe: best opener logit minus best other, over leading blank tokens."""

    def __init__(self, ctx: SeqContext, openers: Sequence[int], max_blank: int):
        self.ctx, self.idx, self.max_blank = ctx, np.asarray(openers, dtype=np.int64), max_blank
        self.j, self.value = 0, -np.inf

    def feed(self, logits: np.ndarray, pos: int) -> int | None:
        margin, other = opener_margin(logits, self.idx)
        self.value = max(self.value, margin)
        if self.j == self.max_blank or self.ctx.llm.is_eog(other) or self.ctx.token_to_piece(other).strip():
            return None
        self.j += 1
        return other


class _Logits:
    """The first reply token's logits (a copy)."""

    value: np.ndarray | None = None

    def feed(self, logits: np.ndarray, pos: int) -> None:
        self.value = logits.copy()
        return None


class _Forced:
    """Teacher-forced logits (len(ids), n_vocab): row j predicts ids[j] after the prompt and ids[:j]."""

    def __init__(self, ids: Sequence[int], n_vocab: int):
        self.ids, self.j = list(ids), 0
        self.value = np.empty((len(self.ids), n_vocab), dtype=np.float32)

    def feed(self, logits: np.ndarray, pos: int) -> int | None:
        self.value[self.j] = logits
        self.j += 1
        return self.ids[self.j - 1] if self.j < len(self.ids) else None


class Job:
    """One request in the engine. Iterate it for the reply's text pieces (a reply job), or call
    :meth:`result` for its value (the reply text, a margin, logits); :meth:`close` cancels it."""

    def __init__(self, engine: "Engine", req: _Request, make_policy: Callable[["Job"], object]):
        self.engine, self.req, self.stats = engine, req, req.stats
        self._make_policy = make_policy
        self.policy = None
        self.seq: int | None = None
        self.pending: list[int] = []  # tokens to decode into the sequence, from position `pos`
        self.pos = 0
        self.cancelled = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False

    # -- consumer side -----------------------------------------------------------------------

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

    def result(self, timeout: float | None = None):
        """The job's value once it is over (re-raises its error)."""
        if not self.done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.policy.value

    def close(self) -> None:
        """Cancel the request (a no-op once it is over); returns once its sequence is freed (the
        scheduler does it after the step in flight)."""
        if not self.done.is_set():
            self.engine._cancel(self)
            if threading.current_thread() is not self.engine._thread:
                self.done.wait()

    # -- engine side -------------------------------------------------------------------------

    def _put(self, piece: str) -> None:
        self._pieces.put(piece)

    def _finish(self, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.error = error
        self.done.set()
        self._pieces.put(_END)


class _Chunks:
    """The chunk iterator of a streamed chat: ``close()`` cancels the job even before the first chunk
    was read (closing a generator that never started runs none of its code)."""

    def __init__(self, chunks: Iterator[dict], job: Job):
        self._chunks, self._job = chunks, job

    def __iter__(self) -> "_Chunks":
        return self

    def __next__(self) -> dict:
        return next(self._chunks)

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._job.close()


class Engine:
    """Serves requests of one :class:`EdgeSafe` together on ``n_parallel`` sequences (see the module doc).

    The EdgeSafe keeps its own context for one-at-a-time calls; the engine adds a second one on the
    same weights. Close the engine before the EdgeSafe (closing the EdgeSafe closes it too).
    """

    def __init__(self, es: EdgeSafe, n_parallel: int = DEFAULT_PARALLEL, *, n_batch: int | None = None,
                 prefix_cache_bytes: int | None = None, seed: int | None = None):
        if not isinstance(n_parallel, int) or isinstance(n_parallel, bool) or n_parallel < 1:
            raise EdgeSafeError(f"parallel must be a whole number >= 1, got {n_parallel!r}")
        es._check_open()
        self.es, self.n_parallel = es, n_parallel
        # deep cells take no position: as in the EdgeSafe's own context, a sequence's KV stream holds n_ctx
        # positions plus every deep cell of the bank
        self.ctx = SeqContext(es._llm, n_parallel, es.n_ctx + es._llm.extra_cells, n_batch=n_batch, unified=False)
        try:
            self._bos_state = self._parse_bos_state() if es._bos_state is not None else None
        except BaseException:  # a layout kv_cells cannot write into (a quantized cache, another blob grammar)
            self.ctx.close()
            raise
        self.prefix_cache = PrefixCache(es.prefix_cache.max_bytes if prefix_cache_bytes is None else prefix_cache_bytes)
        self.last_stats: RequestStats | None = None
        self.steps = 0  # decodes run (for tests and the bench)
        self._rng = np.random.default_rng(seed)
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._free = list(range(n_parallel))
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="edge-safe-engine", daemon=True)
        es._llm._stack.callback(self.close)  # LIFO: runs before the context and the model are freed
        self._thread.start()

    # -- public API ------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, messages: Messages | str, tokens=None, mode: str | None = None, max_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, stop=None, seed: int | None = None,
               strictness: float | None = None, until: Callable[[str], bool] | None = None) -> Job:
        """Queue one reply; iterate the returned :class:`Job` for its pieces (they join to the reply).

        ``until(text_so_far)``, when given, ends the reply early once it returns True (after the
        piece that made it so; no further pieces), e.g. once an evaluation's verdict is settled."""
        req = self.es._prepare(_as_messages(messages), tokens, mode, stop, strictness=strictness)
        check_sampling(temperature, top_p)
        if max_tokens < 1:
            raise EdgeSafeError(f"max_tokens must be >= 1, got {max_tokens}")
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        choose = (lambda names: self._violated(req, names))
        return self._submit(req, lambda job: _Reply(req, self.ctx, self.es.n_ctx, max_tokens, temperature, top_p,
                                                    rng, choose, job._put, until))

    def generate(self, prompt: str, tokens=None, mode: str | None = None, max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop=None, stream: bool = False,
                 system: str | None = None, seed: int | None = None, strictness: float | None = None,
                 until: Callable[[str], bool] | None = None) -> str | Job:
        """As :meth:`EdgeSafe.generate` (the text, or with ``stream=True`` the Job of its pieces)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        job = self.submit(messages, tokens, mode, max_tokens, temperature, top_p, stop, seed, strictness, until)
        return job if stream else "".join(job)

    def chat(self, messages: Messages, tokens=None, mode: str | None = None, stream: bool = False,
             max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, stop=None,
             seed: int | None = None, strictness: float | None = None) -> dict | Iterator[dict]:
        """As :meth:`EdgeSafe.chat`: an OpenAI-shaped completion, or its chunks with ``stream=True``."""
        job = self.submit(messages, tokens, mode, max_tokens, temperature, top_p, stop, seed, strictness)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.es.model_name}
        if stream:
            return _Chunks(self.es._chunks(head, job.req, job), job)
        try:
            content = "".join(job)
        finally:
            job.close()
        st = job.stats
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": st.finish_reason}],
                "usage": _usage(st), "edge_safe": self.es._extra(job.req, content)}

    def refusal_margin(self, messages: Messages | str, tokens=None, max_blank: int = 4,
                       wait: bool = True) -> float | Job:
        """As :meth:`EdgeSafe.refusal_margin`; ``wait=False`` returns the Job (``.result()``)."""
        req, idx = self.es._margin_request(_as_messages(messages), tokens, max_blank)
        job = self._submit(req, lambda job: _Margin(self.ctx, idx, max_blank))
        return job.result() if wait else job

    def first_token_logits(self, messages: Messages | str, tokens=None, mode: str | None = None,
                           wait: bool = True) -> np.ndarray | Job:
        """As :meth:`EdgeSafe.first_token_logits`; ``wait=False`` returns the Job."""
        req = self.es._prepare(_as_messages(messages), tokens, mode, None)
        job = self._submit(req, lambda job: _Logits())
        return job.result() if wait else job

    def forced_logits(self, messages: Messages | str, continuation: Sequence[int], tokens=None,
                      mode: str | None = None, wait: bool = True) -> np.ndarray | Job:
        """As :meth:`EdgeSafe.forced_logits`; ``wait=False`` returns the Job."""
        ids = [int(t) for t in continuation]
        n_vocab = self.ctx.n_vocab
        if not ids or min(ids) < 0 or max(ids) >= n_vocab:
            raise EdgeSafeError(f"continuation must be 1+ token ids in 0..{n_vocab - 1}; got {ids[:8]}")
        req = self.es._prepare(_as_messages(messages), tokens, mode, None, extra=len(ids) - 1)
        job = self._submit(req, lambda job: _Forced(ids, n_vocab))
        return job.result() if wait else job

    @contextlib.contextmanager
    def together(self) -> Iterator["Engine"]:
        """Queue several requests as one: the scheduler admits none of those submitted inside the
        block until it ends. The same requests are then batched the same way on every run, whatever
        the timing of the submitting thread; batch composition moves llama.cpp's logits by up to
        ~0.6 (its matmuls take other paths for other batch shapes), so this keeps an evaluation
        reproducible. Do not wait for a result inside the block (it would never come)."""
        with self._cv:  # re-entrant (Condition's default RLock): _submit takes it again
            yield self

    def close(self) -> None:
        """Stop the scheduler (running and waiting requests fail with EngineClosedError), free the context."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.ctx.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling ----------------------------------------------------------------------

    def _submit(self, req: _Request, make_policy) -> Job:
        job = Job(self, req, make_policy)
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is closed; create a new one")
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def _cancel(self, job: Job) -> None:
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job._finish()
            self._cv.notify_all()
        # a running job is released by the scheduler at its next step

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._waiting or self._running):
                        self._cv.wait()
                    if self._closing:
                        break
                    for job in [j for j in self._running if j.cancelled]:
                        self._release(job)
                    admitted = []
                    while self._waiting and self._free:
                        job = self._waiting.popleft()
                        job.seq = self._free.pop(0)
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

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            jobs = list(self._running) + list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            if job in self._running:
                self._release(job, error)
            else:
                job._finish(error)

    def _release(self, job: Job, error: BaseException | None = None) -> None:
        """End a running job: remove its sequence's cells, free the id, wake its consumer."""
        if job.seq is not None and not self.ctx.closed:
            self.ctx.seq_rm(job.seq)
        with self._cv:
            if job in self._running:
                self._running.remove(job)
            if job.seq is not None:
                self._free.append(job.seq)
                self._free.sort()
            job.seq = None
        if isinstance(job.policy, _Reply):
            self.last_stats = job.stats  # the last reply to end (finished or cancelled)
        job._finish(error)

    def _parse_bos_state(self):
        """``EdgeSafe._parse_bos_state`` on this context: [BOS] decoded into sequence 0, its state parsed and
        checked, the sequence cleared. A context with a KV stream per sequence writes another blob than the
        EdgeSafe's single-sequence one (every stream listed, all but the sequence's own empty), so the deep
        cells are written into a state of this context's own."""
        self.ctx.decode_rows([self.es._llm.bos], [0], [0], [False])
        try:
            blob = self.ctx.save_seq(0)
        finally:
            self.ctx.seq_rm(0)
        return self.es._check_bos_state(blob)

    def _admit(self, job: Job) -> None:
        """Bring the job's sequence to ``[BOS][deep cells][vectors]`` (restored or built), queue its prompt."""
        req, ctx = job.req, self.ctx
        try:
            blob = self.prefix_cache.get(req.key)
            if blob is not None:
                ctx.load_seq(job.seq, blob)
                req.stats.prefix_source = "cache"
            else:
                if req.deep is not None:  # BOS + the deep cells at position 0, written, not decoded
                    ctx.load_seq(job.seq, self.es._deep_state(req, self._bos_state))
                    ctx.decode_vectors(job.seq, req.vectors, 1)
                else:
                    ctx.prefill(job.seq, self.es._llm.bos, req.vectors)
                if self.prefix_cache.max_bytes:
                    self.prefix_cache.put(req.key, ctx.save_seq(job.seq))
                req.stats.prefix_source = "built"
            job.policy = job._make_policy(job)
        except Exception as e:  # this request fails, the others go on
            self._release(job, e)
            return
        job.pos = 1 + len(req.vectors)  # deep cells take no position (EdgeSafe._prefill's n_prefix)
        job.pending = list(req.prompt)
        req.stats.prefilled_tokens = len(req.prompt)

    def _step(self) -> None:
        """One decode: every running job's next token, then prompt chunks, up to n_batch rows."""
        tokens, seqs, pos, want, fed = [], [], [], [], []  # fed: (job, rows taken, row of its logits or -1)
        budget = self.ctx.n_batch
        jobs = [j for j in self._running if j.pending and not j.cancelled]
        jobs.sort(key=lambda j: len(j.pending) > 1)  # decoding rows first, then prompts (stable)
        for job in jobs:
            take = min(len(job.pending), budget - len(tokens))
            if take <= 0:
                break
            tokens += job.pending[:take]
            seqs += [job.seq] * take
            pos += range(job.pos, job.pos + take)
            last = take == len(job.pending)
            want += [False] * (take - 1) + [last]
            fed.append((job, take, len(tokens) - 1 if last else -1))
        if not tokens:
            return
        try:
            self.ctx.decode_rows(tokens, seqs, pos, want)
        except EdgeSafeError as e:
            for job, _, _ in fed:
                self._release(job, e)
            return
        self.steps += 1
        for job, take, row in fed:
            del job.pending[:take]
            job.pos += take
            if row < 0:
                continue
            try:
                nxt = job.policy.feed(self.ctx.logits(row), job.pos)
            except Exception as e:  # e.g. an `until` callback that raised: this request fails, the others go on
                self._release(job, e)
                continue
            if nxt is None or job.cancelled:
                self._release(job)
            else:
                job.pending = [nxt]

    def _violated(self, req: _Request, names: list[str]) -> str:
        """The exact-refusal guide's choice among several active constraints, made exactly as a
        one-at-a-time request makes it: on the EdgeSafe's own context (``EdgeSafe._violated``)."""
        es = self.es
        while not es._lock.acquire(timeout=0.1):
            if self._closing:
                raise EngineClosedError("the engine was closed before this request finished")
        try:
            es._check_open()
            es._owner = threading.get_ident()
            return es._violated(req, names)
        finally:
            es._owner = None
            es._lock.release()
