# Context: the KV cache / recurrent state, batches and decode primitives.

cdef class Context:
    """A llama.cpp inference context over a :class:`Model`.

    ``Context(model, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=0,
    n_threads_batch=0, flash_attn=False, n_seq_max=1, embeddings=False)``.
    Thread counts of 0 mean "all CPUs". One generation runs on a context at a
    time; the Python backend serialises callers with a lock.
    """

    cdef llama_context * ptr
    cdef readonly Model model
    cdef llama_batch batch
    cdef bint has_batch
    cdef bint busy
    cdef readonly int n_batch_alloc

    def __cinit__(self):
        self.ptr = NULL
        self.has_batch = False
        self.busy = False

    def __init__(self, Model model not None, *, n_ctx=4096, n_batch=512, n_ubatch=512,
                 n_threads=0, n_threads_batch=0, bint flash_attn=False, n_seq_max=1,
                 bint embeddings=False, pooling=None):
        model.check_open()
        check_positive("n_ctx", n_ctx)
        check_positive("n_batch", n_batch)
        check_positive("n_ubatch", n_ubatch)
        check_positive("n_seq_max", n_seq_max)
        check_non_negative("n_threads", n_threads)
        check_non_negative("n_threads_batch", n_threads_batch)
        if model.vocab_only:
            raise InvalidInputError("a vocab-only model has no weights to run; load it with vocab_only=False")
        cpus = os.cpu_count() or 1
        cdef llama_context_params params = llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads or cpus
        params.n_threads_batch = n_threads_batch or n_threads or cpus
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.embeddings = embeddings
        params.no_perf = False
        if pooling is not None:
            params.pooling_type = pooling
        take_log_tail()
        with nogil:
            self.ptr = llama_init_from_model(model.ptr, params)
        if self.ptr == NULL:
            reason = take_log_tail()
            raise XybridError("llama.cpp could not create the context"
                              + (f": {reason}" if reason else " (out of memory?)"))
        self.model = model
        model.n_contexts += 1
        self.n_batch_alloc = llama_n_batch(self.ptr)
        self.batch = llama_batch_init(self.n_batch_alloc, 0, n_seq_max)
        if self.batch.token == NULL:
            self.close()
            raise MemoryError("llama_batch_init failed")
        self.has_batch = True

    def __dealloc__(self):
        self._free()

    cdef void _free(self):
        if self.has_batch:
            llama_batch_free(self.batch)
            self.has_batch = False
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL
            if self.model is not None:
                self.model.n_contexts -= 1

    def close(self):
        """Free the context now (KV cache included)."""
        if self.busy:
            raise XybridError("cannot close the context while a generation runs on it")
        self._free()

    @property
    def closed(self):
        return self.ptr == NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef int check_open(self) except -1:
        if self.ptr == NULL:
            raise XybridError("the context has been closed")
        return 0

    cdef int check_idle(self) except -1:
        self.check_open()
        if self.busy:
            raise XybridError("a generation is already running on this context")
        return 0

    # --- facts -----------------------------------------------------------------
    @property
    def n_ctx(self):
        self.check_open()
        return llama_n_ctx(self.ptr)

    @property
    def n_batch(self):
        self.check_open()
        return llama_n_batch(self.ptr)

    @property
    def n_ubatch(self):
        self.check_open()
        return llama_n_ubatch(self.ptr)

    @property
    def n_seq_max(self):
        self.check_open()
        return llama_n_seq_max(self.ptr)

    @property
    def n_threads(self):
        self.check_open()
        return llama_n_threads(self.ptr)

    @property
    def state_size(self):
        """Bytes needed to serialise the context state (KV cache and outputs)."""
        self.check_idle()
        cdef size_t n
        with nogil:
            n = llama_state_get_size(self.ptr)
        return int(n)

    def perf(self):
        """llama.cpp's own counters since the last :meth:`perf_reset`."""
        self.check_open()
        cdef llama_perf_context_data d = llama_perf_context(self.ptr)
        return {"t_start_ms": d.t_start_ms, "t_load_ms": d.t_load_ms,
                "t_prompt_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms,
                "n_prompt_eval": d.n_p_eval, "n_eval": d.n_eval, "n_graph_reused": d.n_reused}

    def perf_reset(self):
        self.check_open()
        llama_perf_context_reset(self.ptr)

    # --- memory ---------------------------------------------------------------------
    def memory_clear(self):
        """Empty the KV cache / recurrent state of every sequence."""
        self.check_idle()
        llama_memory_clear(llama_get_memory(self.ptr), True)

    def seq_rm(self, int seq_id, int p0=0, int p1=-1):
        """Remove positions [p0, p1) of a sequence (p1 = -1: to the end).

        Returns False when the memory cannot do a partial removal (recurrent
        state); the caller must then clear the sequence instead.
        """
        self.check_idle()
        return bool(llama_memory_seq_rm(llama_get_memory(self.ptr), seq_id, p0, p1))

    def seq_pos_max(self, int seq_id=0):
        """Largest position stored for a sequence, -1 when empty."""
        self.check_open()
        return llama_memory_seq_pos_max(llama_get_memory(self.ptr), seq_id)

    # --- generation -------------------------------------------------------------------
    def generate(self, tokens, Sampler sampler not None, *, int max_tokens=256, int n_past=0,
                 int seq_id=0, stop=None, on_text=None, size_t buffer_limit=DEFAULT_BUFFER_LIMIT):
        """Decode ``tokens`` after ``n_past`` cached positions of ``seq_id``
        and generate up to ``max_tokens`` tokens. Returns a
        :class:`GenerationResult`.

        Without ``on_text`` the whole loop runs with the GIL released and
        Python is touched only at the end. With ``on_text`` the loop runs on a
        native thread and ``on_text(chunk)`` receives the text released since
        the previous call; returning ``False`` stops the generation (stop
        reason "cancelled"), and an exception it raises stops it and is
        re-raised here. Either way the context is ready for the next call.
        """
        self.check_idle()
        cdef Generation gen = Generation.__new__(Generation)
        gen.setup(self, list(tokens), n_past, seq_id, max_tokens, sampler, stop,
                  on_text is not None, buffer_limit)
        if on_text is None:
            gen.run_inline()
        else:
            gen.start_thread()
            try:
                for chunk in gen:
                    if on_text(chunk) is False:
                        gen.close()
                        break
            finally:
                gen.close()
        if gen.error is not None:
            raise gen.error
        return gen.result

    def stream(self, tokens, Sampler sampler not None, *, int max_tokens=256, int n_past=0,
               int seq_id=0, stop=None, size_t buffer_limit=DEFAULT_BUFFER_LIMIT):
        """Start a generation on a native thread and return the
        :class:`Generation` iterator of its text chunks."""
        self.check_idle()
        cdef Generation gen = Generation.__new__(Generation)
        gen.setup(self, list(tokens), n_past, seq_id, max_tokens, sampler, stop, True, buffer_limit)
        gen.start_thread()
        return gen

    # --- step-by-step primitives ---------------------------------------------------
    def decode(self, tokens, int pos0=0, int seq_id=0, bint logits_last=True):
        """Decode ``tokens`` at positions pos0, pos0+1, ... of ``seq_id`` in
        ``n_batch`` chunks, with the GIL released. Logits are kept for the last
        token only. The generation loop does the same in C; this is for callers
        that drive their own loop."""
        self.check_idle()
        cdef Py_ssize_t n = len(tokens)
        if n == 0:
            raise InvalidInputError("tokens is empty")
        if pos0 < 0 or pos0 + n > llama_n_ctx(self.ptr):
            raise ContextOverflowError(
                f"positions {pos0}..{pos0 + n - 1} do not fit in the context of {llama_n_ctx(self.ptr)} tokens")
        cdef int32_t n_vocab = llama_vocab_n_tokens(self.model.vocab)
        cdef llama_token * buf = <llama_token *> malloc(n * sizeof(llama_token))
        if buf == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        cdef int32_t rc
        try:
            for i in range(n):
                t = tokens[i]
                if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= n_vocab:
                    raise InvalidInputError(f"tokens[{i}] = {t!r} is not a token id of this vocabulary")
                buf[i] = t
            with nogil:
                rc = decode_tokens(self.ptr, &self.batch, self.n_batch_alloc, buf, <int32_t> n,
                                   pos0, seq_id, logits_last, NULL)
            if rc != 0:
                raise GenerationError(f"llama_decode failed with code {rc}" + _decode_hint(rc))
        finally:
            free(buf)

    def logits(self, int index=-1):
        """A copy of the logits of output ``index`` of the last decode, as a list."""
        self.check_open()
        cdef float * row = llama_get_logits_ith(self.ptr, index)
        if row == NULL:
            raise XybridError(f"no logits for output {index} (was it requested in the last decode?)")
        cdef int32_t i, n = llama_vocab_n_tokens(self.model.vocab)
        return [row[i] for i in range(n)]


cdef int32_t decode_tokens(llama_context * ctx, llama_batch * batch, int32_t n_batch,
                           const llama_token * tokens, int32_t n_tokens, llama_pos pos0,
                           llama_seq_id seq_id, bint logits_last, const int * cancel) noexcept nogil:
    """Decode tokens in chunks of n_batch; return llama_decode's first non-zero
    code, 2 (aborted) when ``cancel`` becomes set between chunks, else 0."""
    cdef int32_t off = 0, n, i, rc
    while off < n_tokens:
        if cancel != NULL and xy_atomic_load(cancel):
            return 2
        n = n_tokens - off
        if n > n_batch:
            n = n_batch
        for i in range(n):
            batch.token[i] = tokens[off + i]
            batch.pos[i] = pos0 + off + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = 1 if (logits_last and off + i == n_tokens - 1) else 0
        batch.n_tokens = n
        rc = llama_decode(ctx, batch[0])
        if rc != 0:
            return rc
        off += n
    return 0


cdef str _decode_hint(int32_t rc):
    if rc == 1:
        return " (no room left in the KV cache)"
    if rc == 2:
        return " (aborted)"
    if rc == -1:
        return " (invalid batch)"
    return " (compute error)"
