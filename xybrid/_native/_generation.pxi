# Generation: the GIL-free decode/sample loop and its Python consumers.
#
# The loop state lives in a C struct (GenState). The loop appends the bytes
# of every sampled token to `text`, finds stop strings and incomplete UTF-8
# there, and advances `emitted` to the end of the bytes that can no longer
# change. A consumer takes text[consumed:emitted]. When streaming, producer and
# consumer share `mu`; the producer blocks only when more than `buffer_limit`
# bytes wait unread (a consumer that stops reading holds the loop back).
# The producer wakes a waiting consumer at most once per `chunk_interval_ns`
# (the first text at once): on a model that makes thousands of tokens a
# second, waking the Python thread for every token costs more CPU than the
# decode itself, and a few tokens per chunk are invisible to a reader.

from weakref import ref as _weakref

STOP_REASONS = ("running", "eog", "stop", "length", "cancelled", "error")

cdef enum:
    REASON_RUNNING = 0
    REASON_EOG = 1
    REASON_STOP = 2
    REASON_LENGTH = 3
    REASON_CANCELLED = 4
    REASON_ERROR = 5

cdef enum:
    ERR_NONE = 0
    ERR_PREFILL = 1
    ERR_DECODE = 2
    ERR_NO_MEMORY = 3
    ERR_SAMPLE = 4
    ERR_KV_FULL = 5             # scheduled: no KV cells left for this sequence's prompt
    ERR_MEDIA = 6               # scheduled: evaluating the media prompt failed

# Phases of a sequence driven by the batching scheduler (_scheduler.pxi).
cdef enum:
    PHASE_QUEUED = 0            # waiting for a free slot
    PHASE_PREFILL = 1           # prompt being decoded, chunk by chunk
    PHASE_GENERATE = 2          # one token per step
    PHASE_DONE = 3


cdef bint gen_should_abort(void * data) noexcept nogil:
    # llama.cpp asks this between graph nodes: cancellation reaches into a
    # long prefill instead of waiting for it to finish.
    return xy_atomic_load(&(<GenState *> data).cancel) != 0


cdef int gen_reserve(GenState * g, size_t extra) noexcept nogil:
    cdef size_t cap
    cdef char * grown
    if g.text_len + extra + 1 <= g.text_cap:
        return 0
    cap = g.text_cap * 2 if g.text_cap else 256
    while cap < g.text_len + extra + 1:
        cap *= 2
    grown = <char *> realloc(g.text, cap)
    if grown == NULL:
        return -1
    g.text = grown
    g.text_cap = cap
    return 0


cdef size_t gen_holdback(GenState * g) noexcept nogil:
    """Bytes at the end of the unreleased text that could still grow into a
    stop string: the longest tail that is a proper prefix of one."""
    cdef size_t pending = g.text_len - g.emitted
    cdef size_t best = 0, k, L
    cdef int32_t s
    for s in range(g.n_stops):
        L = g.stop_lens[s]
        k = L - 1 if L - 1 < pending else pending
        while k > best:
            if memcmp_(g.text + g.text_len - k, g.stops[s], k) == 0:
                best = k
                break
            k -= 1
    return best


cdef inline int memcmp_(const char * a, const char * b, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if a[i] != b[i]:
            return 1
    return 0


cdef bint gen_scan(GenState * g, size_t old_len) noexcept nogil:
    """After appending bytes [old_len, text_len): cut at the earliest stop
    string (return True) or advance `emitted` past what can no longer change."""
    cdef size_t start = g.emitted
    cdef size_t max_back = 0
    cdef int32_t s
    cdef int64_t hit, best = -1
    for s in range(g.n_stops):
        if g.stop_lens[s] > max_back:
            max_back = g.stop_lens[s]
    # A stop string must contain at least one new byte (else it was found
    # before) and cannot start before `emitted` (those bytes were released
    # only once no stop string could start there).
    if max_back > 0 and old_len + 1 > max_back and old_len + 1 - max_back > start:
        start = old_len + 1 - max_back
    for s in range(g.n_stops):
        hit = xy_find(g.text + start, g.text_len - start, g.stops[s], g.stop_lens[s])
        if hit >= 0 and (best < 0 or hit < best):
            best = hit
    if best >= 0:
        g.text_len = start + <size_t> best
        g.emitted = g.text_len
        return True
    cdef size_t safe = g.text_len - gen_holdback(g)
    g.emitted += xy_utf8_complete_len(g.text + g.emitted, safe - g.emitted)
    return False


cdef void gen_wake(GenState * g) noexcept nogil:
    """With `mu` held: wake a consumer waiting on the condition, and poke the
    pipe an event loop watches (astream) when there is one."""
    pthread_cond_broadcast(&g.cond_data)
    if g.wake_fd >= 0:
        if g.sched != NULL and g.phase != PHASE_DONE:
            # Poked once the scheduler's step is over (sched_poke_pending):
            # the event loop then finds every stream of the step ready in one
            # wake-up instead of waking once per stream while the step runs.
            g.poke_pending = True
        else:
            # Non-blocking: a full pipe already says "look".
            xy_poke_fd(g.wake_fd)


cdef void gen_publish(GenState * g) noexcept nogil:
    """Wake the consumer; when too much is unread, wait for it (or cancel).
    A scheduled sequence never waits here: the scheduler parks it instead
    (skips it in later steps), so one slow consumer never holds the others."""
    if not g.streaming:
        return
    cdef int64_t t = xy_now_ns()
    cdef int64_t interval = g.chunk_interval_ns
    if g.sched != NULL and (<SchedState *> g.sched).wake_interval_ns > interval:
        interval = (<SchedState *> g.sched).wake_interval_ns
    if (t - g.last_wake_ns >= interval or g.last_wake_ns == 0
            or g.emitted - g.consumed > g.buffer_limit):
        g.last_wake_ns = t
        gen_wake(g)
    if g.sched != NULL:
        return
    while g.emitted - g.consumed > g.buffer_limit and not xy_atomic_load(&g.cancel):
        pthread_cond_wait(&g.cond_space, &g.mu)


cdef int gen_accept_token(GenState * g, llama_token tok) noexcept nogil:
    """Append the token's bytes and scan them. Returns 1 on a stop string,
    0 to go on, -1 when out of memory."""
    cdef char small[128]
    cdef char * piece = small
    cdef int32_t n = xy_token_to_piece(g.vocab, tok, small, sizeof(small), 0, g.render_special)
    cdef int rc = 0
    cdef size_t old_len
    if n == XY_CALL_FAILED:
        n = 0
    if n < 0:
        piece = <char *> malloc(-n)
        if piece == NULL:
            return -1
        n = xy_token_to_piece(g.vocab, tok, piece, -n, 0, g.render_special)
        if n < 0:
            n = 0
    if g.streaming:
        pthread_mutex_lock(&g.mu)
    if gen_reserve(g, n) != 0:
        rc = -1
    else:
        old_len = g.text_len
        memcpy(g.text + g.text_len, piece, n)
        g.text_len += n
        if gen_scan(g, old_len):
            rc = 1
        gen_publish(g)
    if g.streaming:
        pthread_mutex_unlock(&g.mu)
    if piece != small:
        free(piece)
    return rc


cdef void gen_finish(GenState * g, int reason) noexcept nogil:
    if g.usage_ok:
        g.usage_ok = xy_thread_usage(&g.usage_end) == 0
    if g.streaming:
        pthread_mutex_lock(&g.mu)
    g.reason = reason
    if reason != REASON_STOP:
        # Nothing more can arrive: a held-back partial stop string is plain
        # text now. A dangling incomplete UTF-8 sequence is not a character
        # and is dropped.
        g.emitted += xy_utf8_complete_len(g.text + g.emitted, g.text_len - g.emitted)
        g.text_len = g.emitted
    g.t_end_ns = xy_now_ns()
    g.done = 1
    g.phase = PHASE_DONE
    if g.streaming:
        gen_wake(g)
        pthread_mutex_unlock(&g.mu)


cdef int gen_after_sample(GenState * g, int32_t idx, llama_token tok) noexcept nogil:
    """One sampled token through end check -> accept -> piece -> stop check
    -> emit -> length check (and the token's logprobs, from row ``idx`` of
    the last decode, when asked for). Returns 0 to go on (``tok`` is to be decoded
    next), else the sequence has been finished with that reason. Shared by
    the single-sequence loop and the scheduler."""
    cdef int acc
    g.token_ns[g.n_out] = xy_now_ns()
    if tok < 0:
        g.error_kind = ERR_SAMPLE
        g.error_code = tok
        gen_finish(g, REASON_ERROR)
        return REASON_ERROR
    gen_collect_logprobs(g, idx, tok)  # logits row ``idx``, when asked for
    if llama_vocab_is_eog(g.vocab, tok):
        gen_finish(g, REASON_EOG)
        return REASON_EOG
    g.out_tokens[g.n_out] = tok
    g.n_out += 1
    acc = gen_accept_token(g, tok)
    if acc < 0:
        g.error_kind = ERR_NO_MEMORY
        gen_finish(g, REASON_ERROR)
        return REASON_ERROR
    if acc > 0:
        gen_finish(g, REASON_STOP)
        return REASON_STOP
    if g.n_out >= g.max_tokens or g.n_past >= g.n_ctx:
        gen_finish(g, REASON_LENGTH)
        return REASON_LENGTH
    return 0


cdef void gen_run(GenState * g) noexcept nogil:
    """Prefill the prompt, then sample -> end check -> accept -> piece ->
    stop check -> emit -> decode, until a stop condition."""
    cdef int32_t rc
    cdef llama_token tok
    g.t_start_ns = xy_now_ns()
    g.usage_ok = xy_thread_usage(&g.usage_start) == 0
    rc = 0
    if g.n_prompt > 0:  # 0: the logits of a previous decode are ready
        rc = decode_tokens(g.ctx, g.batch, g.n_batch, g.prompt, g.n_prompt, g.n_past, g.seq_id, True,
                           &g.cancel, g.rpc_base)
    if rc != 0:
        g.t_prefill_end_ns = xy_now_ns()
        if xy_atomic_load(&g.cancel):
            gen_finish(g, REASON_CANCELLED)
        else:
            g.error_kind = ERR_PREFILL
            g.error_code = rc
            gen_finish(g, REASON_ERROR)
        return
    g.n_past += g.n_prompt
    # An asynchronous backend (RPC, CUDA) may still be computing when
    # llama_decode returns; the prefill ends when its results are there.
    # (Sampling would wait for them next anyway.)
    llama_synchronize(g.ctx)
    g.t_prefill_end_ns = xy_now_ns()
    while True:
        if xy_atomic_load(&g.cancel):
            gen_finish(g, REASON_CANCELLED)
            return
        tok = xy_sample(g.smpl, g.grammar, g.ctx, -1, g.candidates, g.n_vocab, g.argmax)
        if gen_after_sample(g, -1, tok) != 0:
            return
        rc = decode_tokens(g.ctx, g.batch, g.n_batch, &tok, 1, g.n_past, g.seq_id, True, &g.cancel,
                           g.rpc_base)
        if rc != 0:
            if xy_atomic_load(&g.cancel):
                gen_finish(g, REASON_CANCELLED)
            else:
                g.error_kind = ERR_DECODE
                g.error_code = rc
                gen_finish(g, REASON_ERROR)
            return
        g.n_past += 1
        g.n_out_decoded += 1


cdef void * gen_thread_main(void * arg) noexcept nogil:
    gen_run(<GenState *> arg)
    return NULL


cdef class GenerationResult:
    """What a finished generation produced: tokens, text and timings.

    Times are integer nanoseconds of :func:`monotonic_ns`. ``n_past`` is the
    number of positions of the sequence in the cache afterwards (prompt plus
    the generated tokens that were decoded).

    ``loop_cpu_ns``, ``loop_waits`` and ``loop_preemptions`` say what the OS
    gave the thread that ran the loop (prefill included; llama.cpp's own
    worker threads, when ``n_threads > 1``, are not counted): its CPU time,
    how often it was switched out to wait (a full stream buffer, a lock),
    and how often another thread took its CPU. ``None`` where the platform
    does not report per-thread usage, and for scheduled sequences, whose
    loop thread serves many at once.

    For a sequence run by a :class:`Scheduler`: ``t_submit_ns`` is when it
    was queued (``t_start_ns`` when it got its slot), ``slot`` the sequence
    id it ran on and ``n_cached`` the prompt tokens it reused from that
    slot's cache (``n_prompt`` counts only the decoded ones). Otherwise
    ``t_submit_ns`` is ``t_start_ns``, ``slot`` the seq_id and
    ``n_cached`` 0.
    """

    def __repr__(self):
        return (f"<GenerationResult {self.stop_reason} tokens={len(self.tokens)} "
                f"text={self.text[:40]!r}>")


@cython.no_gc_clear  # see _engine.pxd
cdef class Generation:
    """One generation on a context, started by :meth:`Context.generate` or
    :meth:`Context.stream`.

    Iterating yields text chunks (``str``) as the loop releases them; each
    chunk holds everything that accumulated since the previous one. Stop it
    early with :meth:`cancel` (from any thread) or :meth:`close`. The final
    :class:`GenerationResult` is :attr:`result` once the iteration ends.
    """

    def __cinit__(self):
        self.sync_ready = False
        self.thread_started = False
        self.finished = False
        self.scratch = NULL
        self.scratch_cap = 0
        self.result = None
        self.error = None
        self.scheduler = None
        self.submitted = False
        self.read_fd = -1
        self.g.wake_fd = -1

    cdef int setup(self, Context context, list tokens, int n_past, int seq_id, int max_tokens,
                   Sampler sampler, stop, bint streaming, size_t buffer_limit,
                   bint logits_ready=False, bint render_special=False,
                   int chunk_interval_us=0, bint scheduled=False,
                   int n_logprobs=-1) except -1:
        cdef Py_ssize_t i, n = len(tokens)
        cdef int32_t n_ctx = llama_n_ctx(context.ptr)
        cdef int32_t n_vocab = llama_vocab_n_tokens(context.model.vocab)
        if n == 0 and not logits_ready:
            raise InvalidInputError("the prompt is empty: nothing to decode")
        if n > 0 and logits_ready:
            raise InvalidInputError("logits_ready=True takes no prompt tokens")
        if logits_ready and llama_get_logits_ith(context.ptr, -1) == NULL:
            # The loop's first llama_sampler_sample would GGML_ASSERT (abort
            # the process) on missing logits; refuse here instead.
            take_log_tail()
            raise XybridError("logits_ready=True but the last decode left no logits to sample from")
        if max_tokens <= 0:
            raise InvalidInputError(f"max_tokens must be a positive integer, got {max_tokens}")
        if n_past < 0:
            raise InvalidInputError(f"n_past must be >= 0, got {n_past}")
        if seq_id < 0 or seq_id >= <int> llama_n_seq_max(context.ptr):
            raise InvalidInputError(f"seq_id {seq_id} is outside 0..{llama_n_seq_max(context.ptr) - 1}")
        if n_past + n >= n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {n_past + n} positions but the context holds {n_ctx}; "
                "shorten the prompt or raise the context length")
        stops = [] if stop is None else ([stop] if isinstance(stop, str) else list(stop))
        self.stop_bytes = []
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InvalidInputError(f"stop sequences must be non-empty strings, got {s!r}")
            self.stop_bytes.append(encode_text(s, "stop sequence"))

        memset_state(&self.g)
        self.g.wake_fd = -1
        self.g.batch_idx = -1
        self.context = context
        self.sampler = sampler
        self.chunk_ns = []
        g = &self.g
        g.ctx = context.ptr
        g.vocab = context.model.vocab
        g.smpl = sampler.ptr
        g.grammar = sampler.grammar
        g.candidates = sampler.candidates
        g.n_vocab = sampler.n_vocab
        g.argmax = sampler.argmax_only
        g.batch = &context.batch
        g.n_batch = context.n_batch_alloc
        g.n_ctx = n_ctx
        g.rpc_base = context.model.rpc_base
        g.seq_id = seq_id
        g.n_past = n_past
        g.max_tokens = max_tokens
        g.streaming = streaming
        g.render_special = render_special
        g.buffer_limit = buffer_limit
        g.chunk_interval_ns = <int64_t> chunk_interval_us * 1000
        g.prompt = <llama_token *> malloc(max(n, 1) * sizeof(llama_token))
        g.out_tokens = <llama_token *> malloc(max_tokens * sizeof(llama_token))
        g.token_ns = <int64_t *> malloc(max_tokens * sizeof(int64_t))
        g.n_stops = <int32_t> len(self.stop_bytes)
        g.stops = <const char **> malloc(max(g.n_stops, 1) * sizeof(char *))
        g.stop_lens = <size_t *> malloc(max(g.n_stops, 1) * sizeof(size_t))
        if (g.prompt == NULL or g.out_tokens == NULL or g.token_ns == NULL
                or g.stops == NULL or g.stop_lens == NULL):
            raise MemoryError("cannot allocate the generation buffers")
        g.n_logprobs = -1
        if n_logprobs >= 0:
            if n_logprobs > n_vocab:
                raise InvalidInputError(f"logprobs={n_logprobs} exceeds the vocabulary of {n_vocab} tokens")
            g.n_logprobs = n_logprobs
            g.logprob = <float *> malloc(max_tokens * sizeof(float))
            g.top_ids = <int32_t *> malloc(max(<size_t> max_tokens * n_logprobs, 1) * sizeof(int32_t))
            g.top_lp = <float *> malloc(max(<size_t> max_tokens * n_logprobs, 1) * sizeof(float))
            if g.logprob == NULL or g.top_ids == NULL or g.top_lp == NULL:
                raise MemoryError("cannot allocate the logprob buffers")
        for i in range(n):
            t = tokens[i]
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= n_vocab:
                raise InvalidInputError(f"prompt token {i} = {t!r} is not a token id of this vocabulary")
            (<llama_token *> g.prompt)[i] = t
        g.n_prompt = <int32_t> n
        for i in range(g.n_stops):
            g.stops[i] = <const char *> (<bytes> self.stop_bytes[i])
            g.stop_lens[i] = len(self.stop_bytes[i])
        if pthread_mutex_init(&g.mu, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        if pthread_cond_init(&g.cond_data, NULL) != 0:
            pthread_mutex_destroy(&g.mu)
            raise MemoryError("pthread_cond_init failed")
        if pthread_cond_init(&g.cond_space, NULL) != 0:
            pthread_cond_destroy(&g.cond_data)
            pthread_mutex_destroy(&g.mu)
            raise MemoryError("pthread_cond_init failed")
        self.sync_ready = True
        if not scheduled:
            context.busy = True
            context.current = _weakref(self)
            llama_set_abort_callback(context.ptr, gen_should_abort, g)
            llama_perf_context_reset(context.ptr)
        # A sampler carries state between tokens (penalty window, grammar
        # position); every generation starts it afresh.
        if xy_sampler_reset(sampler.ptr) != 0 or (
                sampler.grammar != NULL and xy_sampler_reset(sampler.grammar) != 0):
            raise GenerationError("llama.cpp failed to reset the sampler: " + take_log_tail())
        return 0

    cdef int start_thread(self) except -1:
        if pthread_create(&self.thread, NULL, gen_thread_main, &self.g) != 0:
            self.release()
            raise XybridError("could not start the generation thread")
        self.thread_started = True
        return 0

    def __dealloc__(self):
        if self.scheduler is not None and self.submitted:
            # Abandoned while the scheduler may still hold it: cancel, then
            # wait until the scheduler lets go before freeing the state.
            xy_atomic_store(&self.g.cancel, 1)
            self.scheduler.kick()
            self.scheduler.wait_released(&self.g)
            self.submitted = False
        if self.thread_started:
            xy_atomic_store(&self.g.cancel, 1)
            pthread_mutex_lock(&self.g.mu)
            pthread_cond_broadcast(&self.g.cond_space)
            pthread_mutex_unlock(&self.g.mu)
            with nogil:
                pthread_join(self.thread, NULL)
            self.thread_started = False
        self.release()

    cdef void release(self) noexcept:
        """Free the C state once; hand the context back."""
        if self.read_fd >= 0:
            xy_close_fd(self.read_fd)
            xy_close_fd(self.g.wake_fd)
            self.read_fd = -1
            self.g.wake_fd = -1
        if self.scheduler is None and self.context is not None and self.context.busy:
            if self.context.ptr != NULL:
                llama_set_abort_callback(self.context.ptr, NULL, NULL)
            self.context.busy = False
            self.context.current = None
        if self.sync_ready:
            pthread_cond_destroy(&self.g.cond_space)
            pthread_cond_destroy(&self.g.cond_data)
            pthread_mutex_destroy(&self.g.mu)
            self.sync_ready = False
        free(<void *> self.g.prompt)
        free(self.g.out_tokens)
        free(self.g.token_ns)
        free(self.g.text)
        free(<void *> self.g.stops)
        free(self.g.stop_lens)
        free(self.scratch)
        free(self.g.logprob)
        free(self.g.top_ids)
        free(self.g.top_lp)
        self.g.logprob = NULL
        self.g.top_ids = NULL
        self.g.top_lp = NULL
        self.g.prompt = NULL
        self.g.out_tokens = NULL
        self.g.token_ns = NULL
        self.g.text = NULL
        self.g.stops = NULL
        self.g.stop_lens = NULL
        self.scratch = NULL

    def cancel(self):
        """Ask the loop to stop at its next step. Safe from any thread."""
        xy_atomic_store(&self.g.cancel, 1)
        if self.scheduler is not None:
            if self.submitted:
                self.scheduler.kick()
            return
        # Keep the GIL while touching the mutex: finish() (on the consuming
        # thread) destroys it in release() under the GIL right after joining
        # the worker, so releasing the GIL here between the thread_started
        # check and the lock could lock a destroyed mutex. Holding the GIL
        # cannot deadlock: nobody waits for the GIL while holding `mu`.
        if self.thread_started and self.sync_ready:
            pthread_mutex_lock(&self.g.mu)
            pthread_cond_broadcast(&self.g.cond_space)
            pthread_mutex_unlock(&self.g.mu)

    def wait(self):
        """Wait (GIL released) for the generation to end and return its
        :class:`GenerationResult`; re-raise its error, if any."""
        if not self.finished:
            if self.scheduler is None and not self.thread_started:
                raise XybridError("this generation has no loop to wait for")
            if self.scheduler is not None and self.submitted:
                self.scheduler.wait_released_interruptibly(self)
                self.submitted = False
            self.finish()
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def wake_fd(self):
        """Read end of the wake pipe (``Scheduler.submit(wake_pipe=True)``),
        readable when :meth:`poll` has something new; -1 without one."""
        return self.read_fd

    def poll(self):
        """Never blocks: the text released since the last call ("" when
        none yet), or None once the generation has ended and everything has
        been taken (then :attr:`result` is set; an error is raised)."""
        cdef bint oom = False
        cdef size_t n
        if self.finished:
            if self.error is not None:
                raise self.error
            return None
        if self.read_fd >= 0:
            xy_drain_fd(self.read_fd)
        pthread_mutex_lock(&self.g.mu)
        if self.g.consumed == self.g.emitted:
            if not self.g.done:
                pthread_mutex_unlock(&self.g.mu)
                return ""
            pthread_mutex_unlock(&self.g.mu)
            self.finish()
            if self.error is not None:
                raise self.error
            return None
        n = self.take_locked(&oom)
        if oom:
            raise MemoryError()
        self.chunk_ns.append(xy_now_ns())
        return PyBytes_FromStringAndSize(self.scratch, n).decode("utf-8", "replace")

    def token_at(self, int index):
        """The id of sampled token ``index`` (< tokens_at_last_chunk), e.g. the
        last token of the chunk just received."""
        if self.g.out_tokens == NULL or index < 0 or index >= self.tokens_at_last_chunk:
            raise IndexError(index)
        return self.g.out_tokens[index]

    def logprobs_between(self, int start, int stop):
        """The logprobs of sampled tokens ``start`` .. ``stop`` (clamped to
        tokens_at_last_chunk) as (token id, log p, [(id, log p), ...] top
        alternatives) triples; None when logprobs are not being collected.
        Like :meth:`token_at`, for a chunk just received: the loop wrote
        these entries before it counted the tokens, and writes only later
        ones while it runs."""
        cdef int32_t i, j, n = self.g.n_logprobs
        cdef size_t off
        if n < 0:
            return None
        if self.g.logprob == NULL or self.g.out_tokens == NULL:
            if self.result is None or self.result.logprobs is None:
                return None
            ids = self.result.tokens
            stop = min(stop, len(ids))
            return [(ids[k], self.result.logprobs[k], list(self.result.top_logprobs[k]))
                     for k in range(max(start, 0), stop)]
        stop = min(stop, self.tokens_at_last_chunk)
        out = []
        for i in range(max(start, 0), stop):
            off = <size_t> i * <size_t> n
            out.append((self.g.out_tokens[i], self.g.logprob[i],
                        [(self.g.top_ids[off + j], self.g.top_lp[off + j]) for j in range(n)
                         if self.g.top_ids[off + j] >= 0]))
        return out

    @property
    def cancelled(self):
        return xy_atomic_load(&self.g.cancel) != 0

    cdef object take_chunk(self):
        """Return the new text, waiting for it (GIL released) only when
        nothing is ready; None when the loop is done and everything has been
        taken.

        The GIL is kept while the text is ready: releasing it costs nothing
        on an idle interpreter, but beside a busy Python thread every
        re-acquisition waits a switch interval (5 ms), during which a fast
        model makes dozens of tokens. Locking `mu` with the GIL held cannot
        deadlock: the producer holds `mu` only for a few instructions and
        never needs the GIL. The reverse is what to avoid: after a wait,
        `mu` is released before the GIL is taken back, or the loop would
        stall on `mu` while this thread waits for the GIL.
        """
        cdef size_t n
        cdef bint oom = False
        pthread_mutex_lock(&self.g.mu)
        if self.g.consumed == self.g.emitted and not self.g.done:
            with nogil:
                while self.g.consumed == self.g.emitted and not self.g.done:
                    pthread_cond_wait(&self.g.cond_data, &self.g.mu)
                n = self.take_locked(&oom)
        else:
            n = self.take_locked(&oom)
        if oom:
            raise MemoryError()
        if n > 0:
            self.chunk_ns.append(xy_now_ns())
            return PyBytes_FromStringAndSize(self.scratch, n).decode("utf-8", "replace")
        return None

    cdef size_t take_locked(self, bint * oom) noexcept nogil:
        """With `mu` held: move the unread bytes into `scratch`, wake the
        producer, unlock `mu`. Returns the number of bytes taken."""
        cdef size_t n = self.g.emitted - self.g.consumed
        cdef char * grown
        if n > self.scratch_cap:
            grown = <char *> realloc(self.scratch, n)
            if grown == NULL:
                oom[0] = True
                n = 0
            else:
                self.scratch = grown
                self.scratch_cap = n
        if n > 0:
            memcpy(self.scratch, self.g.text + self.g.consumed, n)
            self.g.consumed = self.g.emitted
            pthread_cond_broadcast(&self.g.cond_space)
        self.tokens_at_last_chunk = self.g.n_out
        pthread_mutex_unlock(&self.g.mu)
        if n > 0 and self.g.sched != NULL:
            # The scheduler may have parked this sequence on a full buffer.
            sched_kick(<SchedState *> self.g.sched)
        return n

    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        chunk = self.take_chunk()
        if chunk is not None:
            return chunk
        self.finish()
        if self.error is not None:
            raise self.error
        raise StopIteration

    cdef void finish(self):
        """Join the worker, build the result, free the C state."""
        cdef bint done
        if self.finished:
            return
        if self.scheduler is not None and self.submitted:
            self.scheduler.wait_released(&self.g)
            self.submitted = False
        if self.thread_started:
            pthread_mutex_lock(&self.g.mu)
            done = self.g.done != 0
            pthread_mutex_unlock(&self.g.mu)
            if done:
                # The loop has returned: the thread is exiting and the join
                # is immediate, so keep the GIL (see take_chunk).
                pthread_join(self.thread, NULL)
            else:
                with nogil:
                    pthread_join(self.thread, NULL)
            self.thread_started = False
        self.result = self.build_result()
        self.finished = True
        self.release()

    def close(self):
        """Stop (if still running) and wait for the loop; the result stays available."""
        if not self.finished:
            if not self.g.done:
                self.cancel()
            self.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run_inline(self):
        """Run the whole loop on this thread with the GIL released. On the
        main thread, Ctrl-C cancels it within one decode step and raises
        KeyboardInterrupt (see xy_sigint_arm)."""
        cdef int armed = 0
        if threading.current_thread() is threading.main_thread():
            armed = xy_sigint_arm(&self.g.cancel)
        with nogil:
            gen_run(&self.g)
        if armed:
            xy_sigint_disarm()
        self.finish()
        if armed:
            PyErr_CheckSignals()  # Python's handler runs now: KeyboardInterrupt
        return self.result

    cdef GenerationResult build_result(self):
        g = &self.g
        cdef GenerationResult r = GenerationResult.__new__(GenerationResult)
        cdef int32_t i
        r.tokens = [g.out_tokens[i] for i in range(g.n_out)]
        r.text = PyBytes_FromStringAndSize(g.text, g.text_len).decode("utf-8", "replace") if g.text_len else ""
        r.stop_reason = STOP_REASONS[g.reason]
        r.n_past = g.n_past
        r.n_decoded = g.n_out_decoded
        r.t_start_ns = g.t_start_ns
        r.t_prefill_end_ns = g.t_prefill_end_ns
        r.t_end_ns = g.t_end_ns
        # The EOG token (if any) is timed but not kept: it still marks when
        # the model finished, so keep its stamp only if there are no tokens.
        r.token_ns = [g.token_ns[i] for i in range(g.n_out)]
        r.chunk_ns = self.chunk_ns
        # The context's counters are its own business while a scheduler runs it.
        r.perf = self.context.perf() if self.scheduler is None else {}
        r.n_cached = g.prompt_off
        r.n_prompt = g.n_prompt - g.prompt_off
        r.slot = g.seq_id
        r.t_submit_ns = g.t_submit_ns if self.scheduler is not None else g.t_start_ns
        if g.usage_ok:
            r.loop_cpu_ns = g.usage_end.cpu_ns - g.usage_start.cpu_ns
            r.loop_waits = g.usage_end.waits - g.usage_start.waits
            r.loop_preemptions = g.usage_end.preemptions - g.usage_start.preemptions
        cdef int32_t j, n
        if g.n_logprobs >= 0 and g.logprob != NULL:
            n = g.n_logprobs
            r.logprobs = [g.logprob[i] for i in range(g.n_out)]
            r.top_logprobs = [[(g.top_ids[i * n + j], g.top_lp[i * n + j]) for j in range(n)
                               if g.top_ids[i * n + j] >= 0] for i in range(g.n_out)]
        if g.reason == REASON_ERROR:
            self.error = self.describe_error()
        return r

    cdef object describe_error(self):
        g = &self.g
        if g.error_kind == ERR_NO_MEMORY:
            return MemoryError("out of memory while collecting generated text")
        if g.error_kind == ERR_SAMPLE:
            if g.error_code == XY_SAMPLE_GRAMMAR_BLOCKED:
                return GrammarError("the grammar allows no token of this vocabulary at this "
                                    "point of the reply, so it cannot be completed")
            if g.error_code == XY_SAMPLE_GRAMMAR_TOO_COMPLEX:
                return GrammarError(grammar_bound_message(take_log_tail().strip()))
            if g.error_code == XY_SAMPLE_EXCEPTION:
                reason = take_log_tail().strip()
                return GenerationError("llama.cpp failed while sampling"
                                       + (f": {reason}" if reason else ""))
            return GenerationError("sampling found no candidate token")
        if g.error_kind == ERR_KV_FULL:
            return ContextOverflowError(
                "the KV cache is full: the other running sequences hold every cell, so this "
                "prompt cannot be decoded; retry later or raise the context length")
        stage = "prefill" if g.error_kind == ERR_PREFILL else "decode"
        if g.error_code == XY_RC_RPC_LOST:
            return rpc_lost_error(f"during {stage}")
        if g.error_kind == ERR_MEDIA:
            return GenerationError(f"evaluating the multimodal prompt failed (code {g.error_code})")
        return GenerationError(f"llama_decode failed during {stage} with code {g.error_code}"
                               + _decode_hint(g.error_code))


cdef void memset_state(GenState * g) noexcept nogil:
    cdef char * p = <char *> g
    cdef size_t i
    for i in range(sizeof(GenState)):
        p[i] = 0
