# Context: the KV cache / recurrent state, batches and decode primitives.

POOLING_TYPES = {"none": LLAMA_POOLING_TYPE_NONE, "mean": LLAMA_POOLING_TYPE_MEAN,
                 "cls": LLAMA_POOLING_TYPE_CLS, "last": LLAMA_POOLING_TYPE_LAST}


@cython.no_gc_clear  # see _engine.pxd
cdef class Context:
    """A llama.cpp inference context over a :class:`Model`.

    ``Context(model, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=0,
    n_threads_batch=0, flash_attn=False, n_seq_max=1, embeddings=False,
    swa_full=True)``.
    Thread counts of 0 mean "all CPUs". One generation runs on a context at a
    time; the Python backend serialises callers with a lock.

    ``swa_full`` keeps every position in the caches of sliding-window layers
    (llama.cpp's default), so the cache may be cut at any position; the
    prefix-cache plan of the single-sequence path relies on it. With False
    those layers keep only their window and attend over it, as llama.cpp's
    own tools do: much less work per token once the cache holds more than the
    window (many sequences, long contexts), but a cut is only usable where the
    window before it is still held; the :class:`Scheduler` checks that.
    """

    def __cinit__(self):
        self.ptr = NULL
        self.threadpool = NULL
        self.has_batch = False
        self.busy = False

    def __init__(self, Model model not None, *, n_ctx=4096, n_batch=512, n_ubatch=512,
                 n_threads=0, n_threads_batch=0, bint flash_attn=False, n_seq_max=1,
                 bint embeddings=False, pooling=None, bint kv_unified=True,
                 bint swa_full=True):
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
        params.swa_full = swa_full
        if n_seq_max > 1:
            # Sequences share one pool of n_ctx cells (each may grow to n_ctx
            # positions) instead of n_ctx / n_seq_max cells each.
            params.kv_unified = kv_unified
        if embeddings:
            # Inputs of one embedding batch are separate sequences sharing one
            # KV buffer; nothing is kept between batches.
            params.kv_unified = kv_unified
            params.swa_full = True
        params.no_perf = False
        if pooling is not None:
            if pooling not in POOLING_TYPES:
                raise InvalidInputError(f"pooling must be one of {sorted(POOLING_TYPES)}, got {pooling!r}")
            params.pooling_type = POOLING_TYPES[pooling]
        take_log_tail()
        with nogil:
            self.ptr = llama_init_from_model(model.ptr, params)
        if self.ptr == NULL:
            reason = take_log_tail()
            raise XybridError("llama.cpp could not create the context"
                              + (f": {reason}" if reason else " (out of memory?)"))
        self.model = model
        model.n_contexts += 1
        # One pool sized for the larger of the two thread counts serves both
        # single-token and batch decodes; ggml runs each graph on as many
        # of its threads as that decode asks for.
        with nogil:
            self.threadpool = xy_threadpool_new(max(params.n_threads, params.n_threads_batch))
        if self.threadpool != NULL:
            llama_attach_threadpool(self.ptr, self.threadpool, self.threadpool)
        self.n_batch_alloc = llama_n_batch(self.ptr)
        self.embeddings = embeddings
        self.swa_full = params.swa_full
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
        if self.threadpool != NULL:
            xy_threadpool_free(self.threadpool)
            self.threadpool = NULL

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

    cdef int check_seq(self, int seq_id, bint allow_all=False) except -1:
        # llama.cpp's KV cache GGML_ASSERTs (aborting the process) on a
        # sequence id outside 0..LLAMA_MAX_SEQ-1; refuse anything outside this
        # context's sequences (-1 = "every sequence" where llama.cpp allows it).
        if allow_all and seq_id == -1:
            return 0
        if seq_id < 0 or seq_id >= <int> llama_n_seq_max(self.ptr):
            raise InvalidInputError(
                f"seq_id {seq_id} is outside 0..{llama_n_seq_max(self.ptr) - 1}"
                + (" (or -1 for every sequence)" if allow_all else ""))
        return 0

    # --- memory ---------------------------------------------------------------------
    def memory_clear(self):
        """Empty the KV cache / recurrent state of every sequence."""
        self.check_idle()
        llama_memory_clear(llama_get_memory(self.ptr), True)

    def seq_rm(self, int seq_id, int p0=0, int p1=-1):
        """Remove positions [p0, p1) of a sequence (p1 = -1: to the end).

        Returns False when the memory cannot do a partial removal (recurrent
        state); the caller must then clear the sequence instead. ``seq_id``
        -1 removes the positions from every sequence.
        """
        self.check_idle()
        self.check_seq(seq_id, True)
        return bool(llama_memory_seq_rm(llama_get_memory(self.ptr), seq_id, p0, p1))

    def seq_pos_max(self, int seq_id=0):
        """Largest position stored for a sequence, -1 when empty."""
        self.check_open()
        self.check_seq(seq_id)
        return llama_memory_seq_pos_max(llama_get_memory(self.ptr), seq_id)

    # --- generation -------------------------------------------------------------------
    def cancel(self):
        """Stop the generation running on this context, if any. Safe from any
        thread; the generation ends with stop reason "cancelled"."""
        gen = self.current() if self.current is not None else None
        if gen is not None:
            gen.cancel()
            return True
        return False

    def generate(self, tokens, Sampler sampler not None, *, max_tokens=256, n_past=0,
                 seq_id=0, stop=None, on_text=None, size_t buffer_limit=DEFAULT_BUFFER_LIMIT,
                 bint logits_ready=False, bint render_special=False,
                 int chunk_interval_us=DEFAULT_CHUNK_INTERVAL_US, logprobs=None):
        """Decode ``tokens`` after ``n_past`` cached positions of ``seq_id``
        and generate up to ``max_tokens`` tokens. Returns a
        :class:`GenerationResult`.

        Without ``on_text`` the whole loop runs with the GIL released and
        Python is touched only at the end. With ``on_text`` the loop runs on a
        native thread and ``on_text(chunk)`` receives the text released since
        the previous call; returning ``False`` stops the generation (stop
        reason "cancelled"), and an exception it raises stops it and is
        re-raised here. Either way the context is ready for the next call.

        ``logits_ready=True`` with empty ``tokens`` starts sampling from the
        logits the previous decode left (e.g. after :meth:`eval_chunks`).
        ``render_special=True`` writes the text of control tokens (such as
        tool-call markers) instead of dropping it.

        When streaming, new text is handed over at most every
        ``chunk_interval_us`` microseconds (default 1000); the first text and
        the end come at once. Slower models get one chunk per token either
        way; on a fast one a chunk holds the few tokens made in the interval.
        0 hands over every token as soon as it is made.

        ``logprobs=n`` (an int >= 0) collects, in the loop, the log-probability
        of every sampled token under the model's raw logits and its ``n`` most
        likely alternatives (``result.logprobs``, ``result.top_logprobs``).
        """
        self.check_idle()
        check_non_negative("chunk_interval_us", chunk_interval_us)
        cdef Generation gen = Generation.__new__(Generation)
        gen.setup(self, list(tokens), checked_int("n_past", n_past, -0x80000000, 0x7FFFFFFF),
                  checked_int("seq_id", seq_id, -0x80000000, 0x7FFFFFFF),
                  checked_int("max_tokens", max_tokens, -0x80000000, 0x7FFFFFFF), sampler, stop,
                  on_text is not None, buffer_limit, logits_ready, render_special, chunk_interval_us,
                  False, _logprobs_arg(logprobs))
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

    def stream(self, tokens, Sampler sampler not None, *, max_tokens=256, n_past=0,
               seq_id=0, stop=None, size_t buffer_limit=DEFAULT_BUFFER_LIMIT,
               bint logits_ready=False, bint render_special=False,
               int chunk_interval_us=DEFAULT_CHUNK_INTERVAL_US, logprobs=None):
        """Start a generation on a native thread and return the
        :class:`Generation` iterator of its text chunks (arguments as for
        :meth:`generate`)."""
        self.check_idle()
        check_non_negative("chunk_interval_us", chunk_interval_us)
        cdef Generation gen = Generation.__new__(Generation)
        gen.setup(self, list(tokens), checked_int("n_past", n_past, -0x80000000, 0x7FFFFFFF),
                  checked_int("seq_id", seq_id, -0x80000000, 0x7FFFFFFF),
                  checked_int("max_tokens", max_tokens, -0x80000000, 0x7FFFFFFF), sampler, stop, True, buffer_limit,
                  logits_ready, render_special, chunk_interval_us, False, _logprobs_arg(logprobs))
        gen.start_thread()
        return gen

    # --- multimodal prompts ---------------------------------------------------------------
    def eval_chunks(self, Multimodal mm not None, Chunks chunks not None, int n_past=0, int seq_id=0):
        """Decode a tokenized multimodal prompt (text decoded, media encoded
        then decoded as embeddings) with the GIL released. Returns the new
        ``n_past``; the logits of the last position are ready, so a
        generation can follow with ``logits_ready=True``."""
        self.check_idle()
        mm.check_open()
        if mm.model is not self.model:
            raise InvalidInputError("the projector was loaded for another model")
        if chunks.ptr == NULL or len(chunks) == 0:
            raise InvalidInputError("the multimodal prompt is empty")
        cdef int32_t n_ctx = llama_n_ctx(self.ptr)
        if n_past + chunks.n_pos >= n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {n_past + chunks.n_pos} positions (media included) but the "
                f"context holds {n_ctx}")
        cdef llama_pos new_n_past = 0
        cdef int32_t rc
        take_log_tail()
        with nogil:
            rc = mtmd_helper_eval_chunks(mm.ptr, self.ptr, chunks.ptr, n_past, seq_id,
                                         self.n_batch_alloc, True, &new_n_past)
        if xy_rpc_lost(self.model.rpc_base):
            raise rpc_lost_error("while evaluating the multimodal prompt")
        if rc != 0:
            reason = take_log_tail()
            raise GenerationError(f"evaluating the multimodal prompt failed (code {rc})"
                                  + (f": {reason}" if reason else ""))
        return int(new_n_past)

    # --- embeddings -----------------------------------------------------------------------
    @property
    def pooling(self):
        """The pooling llama.cpp applies to embeddings: "none", "mean", "cls", "last", "rank"."""
        self.check_open()
        return {LLAMA_POOLING_TYPE_NONE: "none", LLAMA_POOLING_TYPE_MEAN: "mean",
                LLAMA_POOLING_TYPE_CLS: "cls", LLAMA_POOLING_TYPE_LAST: "last",
                LLAMA_POOLING_TYPE_RANK: "rank"}.get(llama_get_pooling_type(self.ptr), "unspecified")

    def embed(self, sequences):
        """Pooled embeddings of several token sequences in ONE decode call,
        one llama sequence per input (they do not attend to each other).

        Returns ``(data, n_embd)``: ``data`` is a bytearray of
        ``len(sequences) * n_embd`` float32 values, row per input. The caller
        keeps ``len(sequences) <= n_seq_max`` and the total token count
        ``<= n_batch``.
        """
        self.check_idle()
        if not self.embeddings:
            raise XybridError("this context was created without embeddings=True")
        if llama_get_pooling_type(self.ptr) == LLAMA_POOLING_TYPE_NONE:
            raise InvalidInputError("pooled embeddings need a pooling type other than 'none'")
        cdef Py_ssize_t n_seq = len(sequences)
        if n_seq == 0:
            raise InvalidInputError("no inputs to embed")
        if n_seq > <Py_ssize_t> llama_n_seq_max(self.ptr):
            raise InvalidInputError(
                f"{n_seq} inputs exceed the context's {llama_n_seq_max(self.ptr)} sequences per batch")
        cdef int32_t n_vocab = llama_vocab_n_tokens(self.model.vocab)
        cdef int32_t n_embd = llama_model_n_embd(self.model.ptr)
        cdef Py_ssize_t total = 0, i, j, k = 0
        for i in range(n_seq):
            if len(sequences[i]) == 0:
                raise InvalidInputError(f"input {i} has no tokens")
            total += len(sequences[i])
        if total > self.n_batch_alloc:
            raise ContextOverflowError(
                f"{total} tokens exceed the embedding batch of {self.n_batch_alloc} tokens")
        for i in range(n_seq):
            seq = sequences[i]
            for j in range(len(seq)):
                t = seq[j]
                if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= n_vocab:
                    raise InvalidInputError(f"input {i} token {j} = {t!r} is not a token id")
                self.batch.token[k] = t
                self.batch.pos[k] = j
                self.batch.n_seq_id[k] = 1
                self.batch.seq_id[k][0] = i
                self.batch.logits[k] = 1
                k += 1
        self.batch.n_tokens = <int32_t> total
        cdef int32_t rc
        cdef bint use_encoder = llama_model_has_encoder(self.model.ptr) and not llama_model_has_decoder(self.model.ptr)
        with nogil:
            llama_memory_clear(llama_get_memory(self.ptr), True)
            if use_encoder:
                rc = llama_encode(self.ptr, self.batch)
            else:
                rc = xy_decode(self.ptr, self.batch, self.model.rpc_base)
        if rc == XY_RC_RPC_LOST:
            raise rpc_lost_error("while computing embeddings")
        if rc != 0:
            raise GenerationError(f"embedding decode failed with code {rc}" + _decode_hint(rc))
        out = bytearray(n_seq * n_embd * sizeof(float))
        cdef unsigned char[::1] view = out
        cdef float * row
        for i in range(n_seq):
            row = llama_get_embeddings_seq(self.ptr, <llama_seq_id> i)
            if row == NULL:
                raise GenerationError(f"llama.cpp returned no embedding for input {i}")
            memcpy(&view[i * n_embd * sizeof(float)], row, n_embd * sizeof(float))
        return out, n_embd

    # --- step-by-step primitives ---------------------------------------------------
    def decode(self, tokens, int pos0=0, int seq_id=0, bint logits_last=True):
        """Decode ``tokens`` at positions pos0, pos0+1, ... of ``seq_id`` in
        ``n_batch`` chunks, with the GIL released. Logits are kept for the last
        token only. The generation loop does the same in C; this is for callers
        that drive their own loop."""
        self.check_idle()
        self.check_seq(seq_id)
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
                                   pos0, seq_id, logits_last, NULL, self.model.rpc_base)
            if rc == XY_RC_RPC_LOST:
                raise rpc_lost_error("during decode")
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

    # --- logits buffer (step-by-step loops with Python logits processors) -------------
    def logits_into(self, int index, float[::1] out not None):
        """Copy the logits of output ``index`` of the last decode into ``out``
        (a float32 buffer of n_vocab entries, e.g. a numpy array)."""
        self.check_idle()
        cdef float * row = self._logits_row(index, out.shape[0])
        memcpy(&out[0], row, out.shape[0] * sizeof(float))

    def set_logits(self, int index, const float[::1] values not None):
        """Overwrite the logits of output ``index`` of the last decode, so the
        next :meth:`Sampler.sample` draws from ``values`` (n_vocab float32)."""
        self.check_idle()
        cdef float * row = self._logits_row(index, values.shape[0])
        memcpy(row, &values[0], values.shape[0] * sizeof(float))

    cdef float * _logits_row(self, int index, Py_ssize_t length) except NULL:
        cdef int32_t n = llama_vocab_n_tokens(self.model.vocab)
        if length != n:
            raise InvalidInputError(f"the logits buffer must hold n_vocab = {n} floats, got {length}")
        cdef float * row = llama_get_logits_ith(self.ptr, index)
        if row == NULL:
            take_log_tail()
            raise XybridError(f"no logits for output {index} (was it requested in the last decode?)")
        return row

    # --- sequence state (sessions) ------------------------------------------------------
    def seq_state_size(self, int seq_id=0):
        """Bytes :meth:`seq_state_get` needs for the cache of ``seq_id``."""
        self.check_idle()
        self.check_seq(seq_id)
        return int(llama_state_seq_get_size(self.ptr, seq_id))

    def seq_state_get(self, int seq_id=0):
        """The KV cache / recurrent state of one sequence, as bytes (llama.cpp's
        sequence-state format; logits are not included)."""
        self.check_idle()
        self.check_seq(seq_id)
        cdef size_t size, n
        with nogil:
            size = llama_state_seq_get_size(self.ptr, seq_id)
        out = bytearray(size)
        cdef unsigned char[::1] view = out
        if size == 0:
            return bytes()
        with nogil:
            n = llama_state_seq_get_data(self.ptr, <uint8_t *> &view[0], size, seq_id)
        if n == 0 or n > size:
            raise XybridError("llama.cpp could not copy the sequence state")
        return bytes(out[:n])

    def seq_state_set(self, const unsigned char[::1] data not None, int seq_id=0):
        """Replace the cache of ``seq_id`` with a state from :meth:`seq_state_get`
        (the context must have been made for the same model and a window at
        least as large). Returns the bytes read. On failure the sequence is
        cleared and InvalidInputError raised."""
        self.check_idle()
        self.check_seq(seq_id)
        if data.shape[0] == 0:
            raise InvalidInputError("the sequence state is empty")
        cdef size_t n
        take_log_tail()
        with nogil:
            n = llama_state_seq_set_data(self.ptr, <const uint8_t *> &data[0], data.shape[0], seq_id)
        if n == 0:
            reason = take_log_tail()
            llama_memory_seq_rm(llama_get_memory(self.ptr), seq_id, -1, -1)
            raise InvalidInputError("llama.cpp refused the sequence state (another model or a "
                                    "smaller context?)" + (f": {reason}" if reason else ""))
        return int(n)

    def seq_state_save_file(self, path, tokens=(), int seq_id=0):
        """Write the state of ``seq_id`` and ``tokens`` (what it holds) to a
        file in llama.cpp's own session format. Returns the bytes written."""
        self.check_idle()
        self.check_seq(seq_id)
        cdef bytes bpath = os.fsencode(path)
        cdef Py_ssize_t i, n = len(tokens)
        cdef llama_token * buf = <llama_token *> malloc(max(n, 1) * sizeof(llama_token))
        if buf == NULL:
            raise MemoryError()
        cdef size_t written
        cdef const char * cpath = bpath
        try:
            for i in range(n):
                self.model.check_token(tokens[i])
                buf[i] = tokens[i]
            take_log_tail()
            with nogil:
                written = llama_state_seq_save_file(self.ptr, cpath, seq_id, buf, n)
        finally:
            free(buf)
        if written == 0:
            reason = take_log_tail()
            raise XybridError(f"could not write the session file {path!r}" + (f": {reason}" if reason else ""))
        return int(written)

    def seq_state_load_file(self, path, int seq_id=0, int max_tokens=-1):
        """Load a file from :meth:`seq_state_save_file` into ``seq_id``;
        returns the token list stored with it."""
        self.check_idle()
        self.check_seq(seq_id)
        if not os.path.isfile(path):
            raise InvalidInputError(f"no session file at {path!r}")
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        cdef size_t cap = max_tokens if max_tokens >= 0 else llama_n_ctx(self.ptr)
        cdef size_t count = 0, n
        cdef llama_token * buf = <llama_token *> malloc(max(cap, 1) * sizeof(llama_token))
        if buf == NULL:
            raise MemoryError()
        try:
            take_log_tail()
            with nogil:
                n = llama_state_seq_load_file(self.ptr, cpath, seq_id, buf, cap, &count)
            if n == 0:
                reason = take_log_tail()
                llama_memory_seq_rm(llama_get_memory(self.ptr), seq_id, -1, -1)
                raise InvalidInputError(f"llama.cpp could not load the session file {path!r}"
                                        + (f": {reason}" if reason else ""))
            return [buf[i] for i in range(count)]
        finally:
            free(buf)


cdef int32_t decode_tokens(llama_context * ctx, llama_batch * batch, int32_t n_batch,
                           const llama_token * tokens, int32_t n_tokens, llama_pos pos0,
                           llama_seq_id seq_id, bint logits_last, const int * cancel,
                           uint64_t rpc_base) noexcept nogil:
    """Decode tokens in chunks of n_batch; return llama_decode's first non-zero
    code (XY_RC_RPC_LOST: an RPC server of the model was lost), 2 (aborted)
    when ``cancel`` becomes set between chunks, else 0."""
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
        rc = xy_decode(ctx, batch[0], rpc_base)
        if rc != 0:
            return rc
        off += n
    return 0


cdef int _logprobs_arg(object logprobs) except -2:
    """-1 (off) for None, else the number of alternatives (an int >= 0)."""
    if logprobs is None:
        return -1
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
        raise InvalidInputError(f"logprobs must be None or an int >= 0, got {logprobs!r}")
    return logprobs


cdef str _decode_hint(int32_t rc):
    if rc == 1:
        return " (no room left in the KV cache)"
    if rc == 2:
        return " (aborted)"
    if rc == -1:
        return " (invalid batch)"
    return " (compute error)"
