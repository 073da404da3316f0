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


cdef float logprobs_of_row(const float * row, int32_t n_vocab, llama_token tok, int32_t n,
                           int32_t * top_ids, float * top_lp) noexcept nogil:
    """Log-softmax of ``row`` at ``tok``; writes the ``n`` largest entries
    (ids and log-probabilities) into top_ids/top_lp. Returns log p(tok)."""
    cdef int32_t i, j
    cdef float x, mx = -INFINITY
    cdef double total = 0.0
    for j in range(n):
        top_ids[j] = -1
        top_lp[j] = -INFINITY
    for i in range(n_vocab):
        x = row[i]
        if x > mx:
            mx = x
        # Insertion into the (descending) top-n list; most rows beat nothing.
        if n > 0 and x > top_lp[n - 1]:
            j = n - 1
            while j > 0 and x > top_lp[j - 1]:
                top_lp[j] = top_lp[j - 1]
                top_ids[j] = top_ids[j - 1]
                j -= 1
            top_lp[j] = x
            top_ids[j] = i
    if mx == -INFINITY:  # every logit masked: nothing is defined
        return -INFINITY
    for i in range(n_vocab):
        total += expf(row[i] - mx)
    cdef float lse = mx + <float> logf(<float> total)
    for j in range(n):
        if top_ids[j] >= 0:
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
