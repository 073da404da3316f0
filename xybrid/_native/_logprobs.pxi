# Logprobs: the log-probability of each sampled token and its top-n
# alternatives, computed in C from the raw logits row of the step (before any
# sampler stage changes it: penalties, temperature, grammar), so the numbers
# are the model's own distribution, as OpenAI-style `logprobs` report them.
#
# Only when asked (GenState.n_logprobs >= 0): the cost is two passes over the
# vocabulary per token. The single-sequence loop (gen_run) calls
# gen_collect_logprobs right after sampling; a scheduler stepping many
# sequences calls it per sequence with that sequence's output row.
#
# Storage, owned by the GenState, sized at setup for max_tokens steps:
#   logprob[i]                      log p(token i)
#   top_ids[i*n .. i*n+n), top_lp[] the n most likely tokens of step i, most
#                                   likely first (ties: lower id first)

from libc.math cimport expf, logf, INFINITY


cdef inline bint lp_before(float a, int32_t ia, float b, int32_t ib) noexcept nogil:
    """Ranking order: larger logit first, then the lower token id."""
    return a > b or (a == b and ia < ib)


cdef void lp_sift_down(float * val, int32_t * ids, int32_t start, int32_t count) noexcept nogil:
    """Restore the min-heap (root = the entry ranked last) below ``start``."""
    cdef int32_t root = start, child, worst
    cdef float tv
    cdef int32_t ti
    while True:
        child = 2 * root + 1
        if child >= count:
            return
        worst = root
        if lp_before(val[worst], ids[worst], val[child], ids[child]):
            worst = child
        if child + 1 < count and lp_before(val[worst], ids[worst], val[child + 1], ids[child + 1]):
            worst = child + 1
        if worst == root:
            return
        tv = val[root]; val[root] = val[worst]; val[worst] = tv
        ti = ids[root]; ids[root] = ids[worst]; ids[worst] = ti
        root = worst


cdef float logprobs_of_row(const float * row, int32_t n_vocab, llama_token tok, int32_t n,
                           int32_t * top_ids, float * top_lp) noexcept nogil:
    """Log-softmax of ``row`` at ``tok``; writes the ``n`` (<= n_vocab) best
    entries, ids and log-probabilities, best first, into top_ids/top_lp.
    A bounded min-heap keeps it O(n_vocab log n) for any n. Returns log p(tok)."""
    cdef int32_t i, j, count = 0
    cdef float x, tv, mx = -INFINITY
    cdef int32_t ti
    cdef double total = 0.0
    for i in range(n_vocab):
        x = row[i]
        if x > mx:
            mx = x
        if n == 0:
            continue
        if count < n:
            # Grow the heap: sift the new entry up.
            j = count
            top_lp[j] = x
            top_ids[j] = i
            count += 1
            while j > 0 and lp_before(top_lp[(j - 1) // 2], top_ids[(j - 1) // 2], top_lp[j], top_ids[j]):
                tv = top_lp[j]; top_lp[j] = top_lp[(j - 1) // 2]; top_lp[(j - 1) // 2] = tv
                ti = top_ids[j]; top_ids[j] = top_ids[(j - 1) // 2]; top_ids[(j - 1) // 2] = ti
                j = (j - 1) // 2
        elif lp_before(x, i, top_lp[0], top_ids[0]):
            top_lp[0] = x
            top_ids[0] = i
            lp_sift_down(top_lp, top_ids, 0, count)
    # Heap sort: moving the last-ranked root to the end leaves the best first.
    j = count - 1
    while j > 0:
        tv = top_lp[0]; top_lp[0] = top_lp[j]; top_lp[j] = tv
        ti = top_ids[0]; top_ids[0] = top_ids[j]; top_ids[j] = ti
        lp_sift_down(top_lp, top_ids, 0, j)
        j -= 1
    for j in range(count, n):
        top_ids[j] = -1
        top_lp[j] = -INFINITY
    if mx == -INFINITY:  # every logit masked: nothing is defined
        return -INFINITY
    for i in range(n_vocab):
        total += expf(row[i] - mx)
    cdef float lse = mx + <float> logf(<float> total)
    for j in range(count):
        top_lp[j] = top_lp[j] - lse
    return row[tok] - lse


cdef int gen_collect_logprobs(GenState * g, int32_t idx, llama_token tok) noexcept nogil:
    """Record the logprobs of step ``g.n_out`` (the token just sampled from
    output ``idx`` of the last decode). Returns 0, or -1 when the row is
    missing; a no-op when logprobs were not asked for."""
    if g.n_logprobs < 0 or g.logprob == NULL or g.n_out >= g.max_tokens:
        return 0
    cdef const float * row = llama_get_logits_ith(g.ctx, idx)
    if row == NULL:
        return -1
    cdef int32_t n = g.n_logprobs
    cdef size_t off = <size_t> g.n_out * <size_t> n
    g.logprob[g.n_out] = logprobs_of_row(row, llama_vocab_n_tokens(g.vocab), tok, n,
                                         g.top_ids + off, g.top_lp + off)
    return 0
