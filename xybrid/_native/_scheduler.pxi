# Scheduler: continuous batching. Many sequences of one context are decoded
# together, one llama_decode per step, on one native thread that never
# touches Python.
#
# Each step the thread builds one batch: the pending token of every
# generating sequence, then prompt chunks of sequences being admitted, in
# admission order, up to the step's token budget (n_batch), so a long new
# prompt is spread over several steps instead of freezing the running
# streams. After the decode each sequence samples its own row of logits
# with its own sampler chain and runs the per-sequence pieces the
# single-sequence loop uses (gen_after_sample: end check, stop strings,
# UTF-8 hold-back, its own bounded text buffer, timestamps).
#
# Slots: a context made with n_seq_max = N has N sequence ids sharing one
# unified KV cache. A slot remembers which tokens its sequence holds. A new
# request goes to the free slot whose tokens share the longest prefix with
# its prompt; when another slot (busy or not) holds a longer prefix, those
# cells are shared with llama_memory_seq_cp instead of being decoded again.
# Models whose memory cannot be cut at a position (recurrent, hybrid) start
# every request from an empty sequence. With sliding-window layers that keep
# only their window (Context(swa_full=False), as the backend makes its
# batched contexts), a prefix is kept or shared only where the window before
# its end is still held.
#
# Threads and locks. Lock order: SchedState.mu before a sequence's GenState.mu,
# never the other way round (a consumer unlocks g.mu before it kicks).
# - llama_context, its batch and memory, Slot.cells, and a running
#   sequence's loop fields (phase, n_past, prefilled, next_token, batch_idx,
#   out_tokens, token_ns): the scheduler thread only, from start to close.
# - the admission queue, n_running, stopping, GenState.released and the
#   statistics: under SchedState.mu, any thread.
# - a sequence's text buffer (text, emitted, consumed, done): under its
#   GenState.mu; producer the scheduler thread, consumer the Python side.
# - GenState.cancel: atomic, any thread; SchedState.stopping is also read
#   atomically by llama.cpp's abort callback.
#
# Lifetime. A Generation owns its GenState and keeps the Scheduler (and so
# the context) alive. The scheduler holds a raw pointer from submit until it
# sets `released` under mu; the Generation frees nothing before it has seen
# that (finish() and __dealloc__ wait for it), so the scheduler never reads
# freed memory, however the consumer goes away.


cdef void sched_kick(SchedState * S) noexcept nogil:
    """Tell the scheduler something changed (text taken, a cancel, a submit)."""
    pthread_mutex_lock(&S.mu)
    pthread_cond_signal(&S.cond_work)
    pthread_mutex_unlock(&S.mu)


cdef bint sched_should_abort(void * data) noexcept nogil:
    # Only closing the scheduler interrupts a decode: a batch serves many
    # sequences, so one sequence's cancel waits for the end of the step.
    return xy_atomic_load(&(<SchedState *> data).stopping) != 0


cdef int32_t common_prefix(const llama_token * a, int32_t na, const llama_token * b,
                           int32_t nb) noexcept nogil:
    cdef int32_t i = 0
    cdef int32_t n = na if na < nb else nb
    while i < n and a[i] == b[i]:
        i += 1
    return i


cdef bint seq_parked(GenState * g) noexcept nogil:
    """A generating sequence whose consumer has fallen behind by more than
    its buffer limit skips steps until the consumer catches up."""
    cdef bint parked
    pthread_mutex_lock(&g.mu)
    parked = g.emitted - g.consumed > g.buffer_limit
    pthread_mutex_unlock(&g.mu)
    return parked


cdef void sched_release(SchedState * S, GenState * g) noexcept nogil:
    """Hand a finished sequence back to its consumer: after this the
    scheduler never touches ``g`` again."""
    pthread_mutex_lock(&S.mu)
    g.released = 1
    S.n_finished += 1
    pthread_cond_broadcast(&S.cond_released)
    pthread_mutex_unlock(&S.mu)


cdef void sched_end(SchedState * S, int32_t i, bint drop_cache) noexcept nogil:
    """The sequence in slot ``i`` has finished (gen_finish done): free the
    slot, keeping its cache for the next request unless ``drop_cache``."""
    cdef Slot * slot = &S.slots[i]
    cdef GenState * g = slot.g
    if drop_cache:
        llama_memory_seq_rm(llama_get_memory(S.ctx), i, -1, -1)
        slot.n_cells = 0
        slot.n_pos = 0
    slot.g = NULL
    slot.last_used = S.n_steps
    pthread_mutex_lock(&S.mu)
    S.n_running -= 1
    pthread_mutex_unlock(&S.mu)
    sched_release(S, g)


cdef bint window_held(SchedState * S, llama_memory_t mem, int32_t seq, int32_t end) noexcept nogil:
    """Whether sequence ``seq`` can go on from position ``end`` after a cut
    there: with windowed sliding-window layers, their cache must still hold
    the window before ``end``: the token at ``end`` attends to positions
    above ``end - n_swa``, and llama.cpp drops older ones as a sequence
    advances (lazily, when it needs their cells). The memory keeps a
    sequence's positions contiguous and reports the lowest it still holds."""
    cdef llama_pos lowest
    if S.n_swa <= 0 or end <= 0:
        return True
    lowest = llama_memory_seq_pos_min(mem, seq)
    return lowest >= 0 and lowest <= (end - S.n_swa + 1 if end >= S.n_swa else 0)


cdef void sched_plan(SchedState * S, int32_t i, GenState * g, int32_t lcp) noexcept nogil:
    """Set up slot ``i``'s cache for ``g``'s prompt: keep the common prefix
    (``lcp``, which admission measured), or share a longer one from another
    slot; decode only the rest. A prefix whose sliding window is no longer
    held (see window_held) is not used."""
    cdef Slot * slot = &S.slots[i]
    cdef llama_memory_t mem = llama_get_memory(S.ctx)
    cdef int32_t cap = g.n_prompt - 1   # at least one token is decoded, for logits
    cdef int32_t keep = 0, best, l, j, o = -1
    if g.mm_chunks != NULL or S.recurrent or cap <= 0:
        llama_memory_seq_rm(mem, i, -1, -1)
        slot.n_cells = 0
        slot.n_pos = 0
    else:
        keep = lcp
        if keep > cap:
            keep = cap
        best = keep
        for j in range(S.n_slots):
            if j != i:
                l = common_prefix(S.slots[j].cells, S.slots[j].n_cells, g.prompt, g.n_prompt)
                if l > cap:
                    l = cap
                if l > best and window_held(S, mem, j, l):
                    best = l
                    o = j
        if not llama_memory_seq_rm(mem, i, keep, -1) or not window_held(S, mem, i, keep):
            llama_memory_seq_rm(mem, i, -1, -1)
            keep = 0
        slot.n_cells = keep
        slot.n_pos = keep
        if o >= 0 and best > keep:
            if S.n_swa > 0 and keep > 0:
                # The window before ``best`` may reach below ``keep``, into
                # cells of our own that were dropped: take the whole prefix
                # from the other slot, whose window is held.
                llama_memory_seq_rm(mem, i, -1, -1)
                keep = 0
            llama_memory_seq_cp(mem, o, i, keep, best)
            memcpy(slot.cells + keep, g.prompt + keep, (best - keep) * sizeof(llama_token))
            S.n_copied += best - keep
            slot.n_cells = best
            slot.n_pos = best
            keep = best
    S.n_reused += keep
    g.prompt_off = keep
    g.prefilled = 0
    g.n_past = keep
    g.seq_id = i
    g.phase = PHASE_PREFILL


cdef void sched_admit(SchedState * S) noexcept nogil:
    """With mu held: move waiting sequences into free slots, oldest first,
    each to the free slot that shares the longest prefix with its prompt."""
    cdef GenState * g
    cdef int32_t i, best, l, k
    cdef int64_t now = xy_now_ns()
    while S.n_pending > 0:
        g = S.pending[S.pending_head]
        best = -1
        l = -1
        for i in range(S.n_slots):
            if S.slots[i].g != NULL:
                continue
            k = common_prefix(S.slots[i].cells, S.slots[i].n_cells, g.prompt, g.n_prompt)
            if (best < 0 or k > l
                    or (k == l and S.slots[i].last_used < S.slots[best].last_used)):
                best = i
                l = k
        if best < 0:
            return
        S.pending_head = (S.pending_head + 1) % S.pending_cap
        S.n_pending -= 1
        S.slots[best].g = g
        S.n_running += 1
        S.n_admitted += 1
        g.t_start_ns = now
        sched_plan(S, best, g, l)
        pthread_cond_broadcast(&S.cond_room)


cdef void sched_drop_cancelled(SchedState * S) noexcept nogil:
    """With mu held: end queued sequences whose consumer cancelled them."""
    cdef int32_t n = S.n_pending, k, kept = 0
    cdef GenState * g
    for k in range(n):
        g = S.pending[(S.pending_head + k) % S.pending_cap]
        if xy_atomic_load(&g.cancel):
            g.t_start_ns = xy_now_ns()
            g.t_prefill_end_ns = g.t_start_ns
            gen_finish(g, REASON_CANCELLED)
            g.released = 1
            S.n_finished += 1
            pthread_cond_broadcast(&S.cond_released)
        else:
            S.pending[(S.pending_head + kept) % S.pending_cap] = g
            kept += 1
    if kept != n:
        S.n_pending = kept
        pthread_cond_broadcast(&S.cond_room)


cdef int32_t sched_runnable(SchedState * S) noexcept nogil:
    """With mu held: sequences that can use a step now."""
    cdef int32_t i, n = 0
    cdef GenState * g
    for i in range(S.n_slots):
        g = S.slots[i].g
        if g == NULL:
            continue
        if (g.phase != PHASE_GENERATE or xy_atomic_load(&g.cancel)
                or not seq_parked(g)):
            n += 1
    return n


cdef void sched_add(llama_batch * b, llama_token tok, llama_pos pos, llama_seq_id seq,
                    bint logits) noexcept nogil:
    cdef int32_t k = b.n_tokens
    b.token[k] = tok
    b.pos[k] = pos
    b.n_seq_id[k] = 1
    b.seq_id[k][0] = seq
    b.logits[k] = 1 if logits else 0
    b.n_tokens = k + 1


cdef bint sched_relieve(SchedState * S, bint had_generating, bint had_prefill,
                        int32_t * hold_prefill) noexcept nogil:
    """llama_decode found no KV cells for the batch (its memory is as it
    was). Make room, ending as little as possible: first drop the caches of
    idle slots; then hold prompt chunks back while running sequences
    continue; then end the running sequence that holds the most positions
    (finish "length": it cannot go on); a batch of prompt chunks alone
    ends its newest prompt with a typed error. Returns False when nothing
    could be done (the caller fails the batch)."""
    cdef int32_t i, victim = -1
    cdef llama_memory_t mem = llama_get_memory(S.ctx)
    cdef GenState * g
    cdef bint dropped = False
    for i in range(S.n_slots):
        if S.slots[i].g == NULL and S.slots[i].n_pos > 0:
            llama_memory_seq_rm(mem, i, -1, -1)
            S.slots[i].n_cells = 0
            S.slots[i].n_pos = 0
            S.n_evicted += 1
            dropped = True
    if dropped:
        return True
    if had_generating and had_prefill:
        hold_prefill[0] = 1
        return True
    for i in range(S.n_slots):
        g = S.slots[i].g
        if g == NULL:
            continue
        if had_generating and g.phase != PHASE_GENERATE:
            continue
        if not had_generating and g.phase != PHASE_PREFILL:
            continue
        if victim < 0:
            victim = i
        elif had_generating and S.slots[i].n_pos > S.slots[victim].n_pos:
            victim = i
        elif not had_generating and g.t_start_ns > S.slots[victim].g.t_start_ns:
            victim = i
    if victim < 0:
        return False
    g = S.slots[victim].g
    if had_generating:
        gen_finish(g, REASON_LENGTH)
    else:
        g.t_prefill_end_ns = xy_now_ns()
        g.error_kind = ERR_KV_FULL
        gen_finish(g, REASON_ERROR)
    S.n_kv_full += 1
    sched_end(S, victim, True)
    return True


cdef void sched_eval_media(SchedState * S, int32_t i) noexcept nogil:
    """Evaluate a media prompt whole (mtmd decodes text and media chunks
    itself), then sample its first token from the last position's logits,
    before the next batch overwrites them."""
    cdef GenState * g = S.slots[i].g
    cdef llama_pos new_n_past = 0
    cdef int32_t rc = mtmd_helper_eval_chunks(
        <mtmd_context *> g.mm_ctx, S.ctx, <const mtmd_input_chunks *> g.mm_chunks,
        0, i, S.n_batch, True, &new_n_past)
    if rc == 0 and xy_rpc_lost(S.rpc_base):
        rc = XY_RC_RPC_LOST
    g.t_prefill_end_ns = xy_now_ns()
    S.slots[i].n_cells = 0      # media positions are not token ids: never reused
    S.slots[i].n_pos = new_n_past
    if rc != 0:
        if xy_atomic_load(&S.stopping):
            gen_finish(g, REASON_CANCELLED)
        else:
            g.error_kind = ERR_MEDIA
            g.error_code = rc
            gen_finish(g, REASON_ERROR)
        sched_end(S, i, True)
        return
    g.n_past = new_n_past
    g.phase = PHASE_GENERATE
    cdef llama_token tok = xy_sample(g.smpl, g.grammar, S.ctx, -1, g.candidates, g.n_vocab, g.argmax)
    if gen_after_sample(g, -1, tok) != 0:
        sched_end(S, i, False)
    else:
        g.next_token = tok


cdef void sched_step(SchedState * S, int32_t * hold_prefill) noexcept nogil:
    """One step: cancels, media prompts, one batch, one decode, one sample
    per sequence that asked for logits."""
    cdef int32_t i, j, k, take, remaining, rc, budget
    cdef int32_t n_seqs = 0
    cdef int32_t n_streaming = 0
    cdef int32_t order[512]
    cdef int32_t n_order = 0
    cdef int32_t takes[512]
    cdef bint in_batch[512]
    cdef GenState * g
    cdef llama_batch * b = S.batch
    cdef bint had_generating = False, had_prefill = False
    cdef int64_t t0 = xy_now_ns()
    cdef llama_token tok
    cdef Slot * slot

    for i in range(S.n_slots):
        g = S.slots[i].g
        if g == NULL:
            continue
        if xy_atomic_load(&g.cancel):
            if g.phase == PHASE_PREFILL:
                g.t_prefill_end_ns = xy_now_ns()
            gen_finish(g, REASON_CANCELLED)
            sched_end(S, i, False)
        elif g.phase == PHASE_PREFILL and g.mm_chunks != NULL:
            sched_eval_media(S, i)

    b.n_tokens = 0
    for i in range(S.n_slots):
        takes[i] = 0
        in_batch[i] = False
        g = S.slots[i].g
        if g == NULL or g.phase != PHASE_GENERATE or seq_parked(g):
            continue
        in_batch[i] = True
        g.batch_idx = b.n_tokens
        sched_add(b, g.next_token, g.n_past, i, True)
        had_generating = True
        n_seqs += 1
        n_streaming += g.streaming
    S.wake_interval_ns = n_streaming * (1000000000 // STREAM_WAKES_PER_SECOND)
    # Prompt chunks, oldest admission first, within what is left of the budget.
    budget = S.n_batch - b.n_tokens
    if hold_prefill[0]:
        budget = 0
        hold_prefill[0] = 0
    for i in range(S.n_slots):
        g = S.slots[i].g
        if g != NULL and g.phase == PHASE_PREFILL and g.mm_chunks == NULL:
            order[n_order] = i
            n_order += 1
    for j in range(n_order):        # insertion sort by admission time (a few slots)
        k = j
        while k > 0 and S.slots[order[k - 1]].g.t_start_ns > S.slots[order[k]].g.t_start_ns:
            i = order[k - 1]
            order[k - 1] = order[k]
            order[k] = i
            k -= 1
    for j in range(n_order):
        if budget <= 0:
            break
        i = order[j]
        g = S.slots[i].g
        remaining = g.n_prompt - g.prompt_off - g.prefilled
        take = remaining if remaining < budget else budget
        for k in range(take):
            sched_add(b, g.prompt[g.prompt_off + g.prefilled + k], g.n_past + k, i,
                      k == remaining - 1)
        if take == remaining:
            g.batch_idx = b.n_tokens - 1
        takes[i] = take
        in_batch[i] = True
        budget -= take
        had_prefill = True
        n_seqs += 1
    if b.n_tokens == 0:
        return

    rc = xy_decode(S.ctx, b[0], S.rpc_base)
    if rc != 0:
        for i in range(S.n_slots):
            if S.slots[i].g != NULL:
                S.slots[i].g.batch_idx = -1
        if rc == 1 and sched_relieve(S, had_generating, had_prefill, hold_prefill):
            return
        # The batch as a whole failed (a compute error, or an abort on close):
        # end the sequences it carried; the others are untouched.
        for i in range(S.n_slots):
            g = S.slots[i].g
            if g == NULL or not in_batch[i]:
                continue
            if g.phase == PHASE_PREFILL:
                g.t_prefill_end_ns = xy_now_ns()
            if xy_atomic_load(&S.stopping):
                gen_finish(g, REASON_CANCELLED)
            else:
                g.error_kind = ERR_DECODE if g.phase == PHASE_GENERATE else ERR_PREFILL
                g.error_code = rc
                gen_finish(g, REASON_ERROR)
            sched_end(S, i, True)
        return

    if had_prefill:
        # Prompts that finish in this step are stamped when their results
        # exist: an asynchronous backend (RPC, CUDA) may still be computing.
        llama_synchronize(S.ctx)
    for i in range(S.n_slots):
        g = S.slots[i].g
        if g == NULL:
            continue
        slot = &S.slots[i]
        if takes[i] > 0:
            memcpy(slot.cells + slot.n_cells, g.prompt + g.prompt_off + g.prefilled,
                   takes[i] * sizeof(llama_token))
            slot.n_cells += takes[i]
            slot.n_pos += takes[i]
            g.prefilled += takes[i]
            g.n_past += takes[i]
            if g.batch_idx < 0:
                continue
            g.t_prefill_end_ns = xy_now_ns()
            g.phase = PHASE_GENERATE
        elif g.phase == PHASE_GENERATE and g.batch_idx >= 0:
            slot.cells[slot.n_cells] = g.next_token
            slot.n_cells += 1
            slot.n_pos += 1
            g.n_past += 1
            g.n_out_decoded += 1
        else:
            continue
        k = g.batch_idx
        g.batch_idx = -1
        tok = xy_sample(g.smpl, g.grammar, S.ctx, k, g.candidates, g.n_vocab, g.argmax)
        if gen_after_sample(g, k, tok) != 0:
            sched_end(S, i, False)
        else:
            g.next_token = tok

    pthread_mutex_lock(&S.mu)
    S.n_steps += 1
    S.n_step_seqs += n_seqs
    S.n_step_tokens += b.n_tokens
    S.busy_ns += xy_now_ns() - t0
    S.kv_pos_used = 0
    for i in range(S.n_slots):
        S.kv_pos_used += S.slots[i].n_pos
    pthread_mutex_unlock(&S.mu)


cdef void sched_shutdown(SchedState * S) noexcept nogil:
    """Closing: every running and waiting sequence ends "cancelled"."""
    cdef int32_t i
    cdef GenState * g
    for i in range(S.n_slots):
        g = S.slots[i].g
        if g != NULL:
            if g.phase == PHASE_PREFILL:
                g.t_prefill_end_ns = xy_now_ns()
            gen_finish(g, REASON_CANCELLED)
            sched_end(S, i, True)
    pthread_mutex_lock(&S.mu)
    while S.n_pending > 0:
        g = S.pending[S.pending_head]
        S.pending_head = (S.pending_head + 1) % S.pending_cap
        S.n_pending -= 1
        g.t_start_ns = xy_now_ns()
        g.t_prefill_end_ns = g.t_start_ns
        gen_finish(g, REASON_CANCELLED)
        g.released = 1
        S.n_finished += 1
    pthread_cond_broadcast(&S.cond_released)
    pthread_cond_broadcast(&S.cond_room)
    pthread_mutex_unlock(&S.mu)


cdef void sched_clear_idle(SchedState * S) noexcept nogil:
    """With mu held: forget what the idle slots' caches hold."""
    cdef int32_t i
    for i in range(S.n_slots):
        if S.slots[i].g == NULL and S.slots[i].n_pos > 0:
            llama_memory_seq_rm(llama_get_memory(S.ctx), i, -1, -1)
            S.slots[i].n_cells = 0
            S.slots[i].n_pos = 0
    S.clear_idle = 0
    pthread_cond_broadcast(&S.cond_released)


cdef void sched_poke_pending(SchedState * S) noexcept nogil:
    """After a step: poke the wake pipes its tokens were promised to. A state
    still in its slot has not been released, so its pipe is open; one that
    finished in the step was poked when it finished."""
    cdef int32_t i
    cdef GenState * g
    for i in range(S.n_slots):
        g = S.slots[i].g
        if g != NULL and g.poke_pending:
            g.poke_pending = False
            xy_poke_fd(g.wake_fd)


cdef void * sched_main(void * arg) noexcept nogil:
    cdef SchedState * S = <SchedState *> arg
    cdef int32_t hold_prefill = 0
    while True:
        pthread_mutex_lock(&S.mu)
        if xy_atomic_load(&S.stopping):
            pthread_mutex_unlock(&S.mu)
            break
        if S.clear_idle:
            sched_clear_idle(S)
        sched_drop_cancelled(S)
        sched_admit(S)
        # Holding mu from the check to the wait: every kick needs mu, so a
        # change after the check wakes the wait instead of being missed.
        if sched_runnable(S) == 0:
            pthread_cond_wait(&S.cond_work, &S.mu)
            pthread_mutex_unlock(&S.mu)
            continue
        pthread_mutex_unlock(&S.mu)
        sched_step(S, &hold_prefill)
        sched_poke_pending(S)
    sched_shutdown(S)
    return NULL


@cython.no_gc_clear  # see _engine.pxd
cdef class Scheduler:
    """Continuous batching on a :class:`Context`: sequences submitted from
    any thread are decoded together, one ``llama_decode`` per step, on one
    native thread.

    ``Scheduler(context, max_queued=64)`` takes the context over (its
    ``n_seq_max`` sequences are the slots; nothing else may use it until
    :meth:`close`). :meth:`submit` queues a request and returns its
    :class:`Generation`: iterate it for text chunks, or call
    :meth:`Generation.wait` for the result. Up to ``max_queued`` requests
    wait for a slot, in arrival order; one more raises
    :class:`~xybrid.errors.OverloadedError` (or waits, with ``block=True``).
    """


    def __cinit__(self):
        self.running = False
        self.sync_ready = False
        self.s.slots = NULL
        self.s.pending = NULL

    def __init__(self, Context context not None, *, int max_queued=64):
        context.check_idle()
        if context.embeddings:
            raise InvalidInputError("an embeddings context cannot generate")
        check_non_negative("max_queued", max_queued)
        cdef int32_t n_slots = llama_n_seq_max(context.ptr)
        cdef int32_t n_ctx = llama_n_ctx(context.ptr)
        if n_slots > 512:
            raise InvalidInputError(f"at most 512 sequences per scheduler, got {n_slots}")
        if n_slots > context.n_batch_alloc:
            raise InvalidInputError(
                f"n_batch ({context.n_batch_alloc}) must be at least the number of sequences "
                f"({n_slots}): every generating sequence needs a row in each step")
        S = &self.s
        S.ctx = context.ptr
        S.rpc_base = context.model.rpc_base
        S.batch = &context.batch
        S.n_batch = context.n_batch_alloc
        S.n_ctx = n_ctx
        S.n_slots = n_slots
        S.recurrent = (llama_model_is_recurrent(context.model.ptr)
                       or llama_model_is_hybrid(context.model.ptr))
        S.n_swa = 0 if context.swa_full else max(0, llama_model_n_swa(context.model.ptr))
        S.max_queued = max_queued
        S.pending_cap = max_queued + n_slots
        S.slots = <Slot *> calloc(n_slots, sizeof(Slot))
        S.pending = <GenState **> calloc(S.pending_cap, sizeof(GenState *))
        if S.slots == NULL or S.pending == NULL:
            self.free_state()
            raise MemoryError("cannot allocate the scheduler's slots")
        cdef int32_t i
        for i in range(n_slots):
            S.slots[i].cells = <llama_token *> malloc(n_ctx * sizeof(llama_token))
            if S.slots[i].cells == NULL:
                self.free_state()
                raise MemoryError("cannot allocate the scheduler's slots")
        if pthread_mutex_init(&S.mu, NULL) != 0:
            self.free_state()
            raise MemoryError("pthread_mutex_init failed")
        if pthread_cond_init(&S.cond_work, NULL) != 0:
            pthread_mutex_destroy(&S.mu)
            self.free_state()
            raise MemoryError("pthread_cond_init failed")
        if pthread_cond_init(&S.cond_released, NULL) != 0:
            pthread_cond_destroy(&S.cond_work)
            pthread_mutex_destroy(&S.mu)
            self.free_state()
            raise MemoryError("pthread_cond_init failed")
        if pthread_cond_init(&S.cond_room, NULL) != 0:
            pthread_cond_destroy(&S.cond_released)
            pthread_cond_destroy(&S.cond_work)
            pthread_mutex_destroy(&S.mu)
            self.free_state()
            raise MemoryError("pthread_cond_init failed")
        self.sync_ready = True
        self.context = context
        # The scheduler's requests decide what the cache holds from now on.
        llama_memory_clear(llama_get_memory(context.ptr), True)
        llama_set_abort_callback(context.ptr, sched_should_abort, S)
        context.busy = True
        if pthread_create(&self.thread, NULL, sched_main, S) != 0:
            llama_set_abort_callback(context.ptr, NULL, NULL)
            context.busy = False
            raise XybridError("could not start the scheduler thread")
        self.running = True

    cdef void free_state(self) noexcept:
        cdef int32_t i
        if self.s.slots != NULL:
            for i in range(self.s.n_slots):
                free(self.s.slots[i].cells)
            free(self.s.slots)
            self.s.slots = NULL
        free(self.s.pending)
        self.s.pending = NULL
        if self.sync_ready:
            pthread_cond_destroy(&self.s.cond_room)
            pthread_cond_destroy(&self.s.cond_released)
            pthread_cond_destroy(&self.s.cond_work)
            pthread_mutex_destroy(&self.s.mu)
            self.sync_ready = False

    def __dealloc__(self):
        self.stop()
        self.free_state()

    cdef void stop(self) noexcept:
        if not self.running:
            return
        pthread_mutex_lock(&self.s.mu)
        xy_atomic_store(&self.s.stopping, 1)
        pthread_cond_signal(&self.s.cond_work)
        pthread_mutex_unlock(&self.s.mu)
        with nogil:
            pthread_join(self.thread, NULL)
        self.running = False
        if self.context is not None and self.context.ptr != NULL:
            llama_set_abort_callback(self.context.ptr, NULL, NULL)
            # The slots' records go with the thread: empty what they described.
            llama_memory_clear(llama_get_memory(self.context.ptr), True)
            self.context.busy = False

    def close(self):
        """Stop the thread: running and waiting requests end "cancelled"
        (their consumers get what was generated so far). The context is
        free for other use afterwards, with an empty cache."""
        self.stop()

    @property
    def closed(self):
        return not self.running

    @property
    def n_slots(self):
        return self.s.n_slots

    cdef void kick(self) noexcept:
        if self.sync_ready:
            sched_kick(&self.s)

    cdef void wait_released(self, GenState * g) noexcept:
        with nogil:
            pthread_mutex_lock(&self.s.mu)
            while not g.released:
                pthread_cond_wait(&self.s.cond_released, &self.s.mu)
            pthread_mutex_unlock(&self.s.mu)

    cdef int wait_released_interruptibly(self, Generation gen) except -1:
        """wait_released, waking every 50 ms to let Python handle a signal:
        Ctrl-C cancels the request (the scheduler lets go of it within a
        step) and is raised here."""
        cdef GenState * g = &gen.g
        cdef bint released = False
        while not released:
            with nogil:
                pthread_mutex_lock(&self.s.mu)
                if not g.released:
                    xy_cond_wait_ms(&self.s.cond_released, &self.s.mu, 50)
                released = g.released != 0
                pthread_mutex_unlock(&self.s.mu)
            if not released:
                try:
                    PyErr_CheckSignals()
                except BaseException:
                    xy_atomic_store(&g.cancel, 1)
                    self.kick()
                    self.wait_released(g)
                    gen.submitted = False
                    gen.finish()
                    raise
        return 0

    def submit(self, tokens, Sampler sampler not None, *, int max_tokens=256, stop=None,
               bint render_special=False, bint streaming=True,
               size_t buffer_limit=DEFAULT_BUFFER_LIMIT,
               int chunk_interval_us=DEFAULT_CHUNK_INTERVAL_US, bint wake_pipe=False,
               Multimodal mm=None, Chunks chunks=None, bint block=False, logprobs=None):
        """Queue a request; returns its :class:`Generation` at once.

        ``tokens`` is the whole prompt (the scheduler reuses what a slot's
        cache already holds). ``streaming=False`` never parks the sequence:
        its text is read once, at the end (:meth:`Generation.wait`). With
        ``wake_pipe=True`` the generation has a :attr:`Generation.wake_fd`
        to watch (e.g. ``loop.add_reader``) and :meth:`Generation.poll` to
        read without blocking. A media prompt passes ``mm`` and ``chunks``
        (from :meth:`Multimodal.tokenize`) and no tokens. ``logprobs=n``
        collects each token's log-probability and its ``n`` best
        alternatives, as :meth:`Context.generate` does.

        Raises :class:`~xybrid.errors.OverloadedError` when every slot is
        busy and ``max_queued`` requests already wait, unless ``block=True``,
        which waits for room instead (with the GIL released).
        """
        if not self.running:
            raise XybridError("the scheduler has been closed")
        check_non_negative("chunk_interval_us", chunk_interval_us)
        self.context.model.check_open()
        if sampler.model is not self.context.model:
            raise InvalidInputError("the sampler was built for another model")
        cdef Generation gen = Generation.__new__(Generation)
        cdef bint media = chunks is not None
        cdef int fds[2]
        if media:
            if mm is None:
                raise InvalidInputError("a media prompt needs its Multimodal projector")
            mm.check_open()
            if mm.model is not self.context.model:
                raise InvalidInputError("the projector was loaded for another model")
            if chunks.ptr == NULL or len(chunks) == 0:
                raise InvalidInputError("the multimodal prompt is empty")
            if len(tokens) != 0:
                raise InvalidInputError("a media prompt takes its tokens from its chunks")
            if chunks.n_pos >= self.s.n_ctx:
                raise ContextOverflowError(
                    f"the prompt needs {chunks.n_pos} positions (media included) but the "
                    f"context holds {self.s.n_ctx}")
        gen.setup(self.context, [0] if media else list(tokens), 0, 0, max_tokens, sampler, stop,
                  True, buffer_limit if streaming else <size_t> -1, False, render_special,
                  chunk_interval_us, True, _logprobs_arg(logprobs))
        g = &gen.g
        if media:
            g.mm_ctx = <void *> mm.ptr
            g.mm_chunks = <void *> chunks.ptr
            g.mm_n_pos = chunks.n_pos
            g.n_prompt = 0
            gen.keep_alive = (mm, chunks)
        if wake_pipe:
            if xy_pipe_nonblock(fds) != 0:
                raise OSError("cannot create the wake pipe")
            gen.read_fd = fds[0]
            g.wake_fd = fds[1]
        gen.scheduler = self
        g.sched = &self.s
        g.t_submit_ns = xy_now_ns()
        cdef SchedState * S = &self.s
        cdef bint full
        pthread_mutex_lock(&S.mu)
        while True:
            if xy_atomic_load(&S.stopping):
                pthread_mutex_unlock(&S.mu)
                raise XybridError("the scheduler has been closed")
            full = S.n_running + S.n_pending >= S.n_slots + S.max_queued
            if not full:
                break
            if not block:
                pthread_mutex_unlock(&S.mu)
                raise OverloadedError(
                    f"all {S.n_slots} slots are busy and the queue of {S.max_queued} waiting "
                    "requests is full; retry later")
            with nogil:
                pthread_cond_wait(&S.cond_room, &S.mu)
        S.pending[(S.pending_head + S.n_pending) % S.pending_cap] = g
        S.n_pending += 1
        gen.submitted = True
        pthread_cond_signal(&S.cond_work)
        pthread_mutex_unlock(&S.mu)
        return gen

    def clear_idle_caches(self):
        """Forget what the idle slots' caches hold (running requests keep
        theirs); returns once done."""
        if not self.running:
            return
        S = &self.s
        with nogil:
            pthread_mutex_lock(&S.mu)
            S.clear_idle = 1
            pthread_cond_signal(&S.cond_work)
            while S.clear_idle and not xy_atomic_load(&S.stopping):
                pthread_cond_wait(&S.cond_released, &S.mu)
            pthread_mutex_unlock(&S.mu)

    def stats(self):
        """Load and counters: slots, running and queued sequences, KV
        positions held, steps, mean sequences and tokens per step, prompt
        tokens reused or shared between slots, caches evicted and sequences
        ended by a full cache."""
        S = &self.s
        pthread_mutex_lock(&S.mu)
        out = {
            "parallel": S.n_slots,
            "running": S.n_running,
            "queued": S.n_pending,
            "kv_cells_used": S.kv_pos_used,
            "kv_cells_total": S.n_ctx,
            "steps": S.n_steps,
            "batch_occupancy": (<double> S.n_step_seqs / S.n_steps) if S.n_steps else 0.0,
            "tokens_per_step": (<double> S.n_step_tokens / S.n_steps) if S.n_steps else 0.0,
            "requests_admitted": S.n_admitted,
            "requests_finished": S.n_finished,
            "prompt_tokens_reused": S.n_reused,
            "prompt_tokens_shared": S.n_copied,
            "caches_evicted": S.n_evicted,
            "ended_by_full_cache": S.n_kv_full,
            "busy_s": S.busy_ns / 1e9,
        }
        pthread_mutex_unlock(&S.mu)
        return out
