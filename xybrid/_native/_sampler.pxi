# Sampler: a llama.cpp sampler chain built from plain parameters.

import math
import numbers

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a fresh random seed per chain
FLT_MAX = 3.4028234663852886e38  # the largest finite C float


def check_logit_bias(logit_bias, int32_t n_vocab):
    """``logit_bias`` (a mapping token id -> bias, or (id, bias) pairs) as a
    list of (id, bias) pairs, checked: ids of this vocabulary, biases finite
    and within +-MAX_LOGIT_BIAS, at most MAX_LOGIT_BIAS_ENTRIES entries."""
    # The bounds live in xybrid.types; imported here, not at module level,
    # so that importing the engine does not load typing (test_import_cost).
    from xybrid.types import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES
    if logit_bias is None:
        return []
    items = logit_bias.items() if hasattr(logit_bias, "items") else logit_bias
    try:
        pairs = list(items)
    except TypeError:
        raise InvalidInputError(
            f"logit_bias must be a mapping of token id -> bias, got {type(logit_bias).__name__}") from None
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidInputError(
            f"logit_bias has {len(pairs)} entries, over the limit of {MAX_LOGIT_BIAS_ENTRIES}")
    out = []
    for pair in pairs:
        try:
            tok, bias = pair
        except (TypeError, ValueError):
            raise InvalidInputError(f"logit_bias entries must be (token id, bias) pairs, got {pair!r}") from None
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise InvalidInputError(f"logit_bias keys must be int token ids, got {tok!r}")
        if not 0 <= tok < n_vocab:
            raise InvalidInputError(
                f"logit_bias names token {tok}, which is not a token id of this model (0..{n_vocab - 1})")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
            raise InvalidInputError(f"logit_bias[{tok}] must be a number, got {bias!r}")
        value = float(bias)
        if not math.isfinite(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise InvalidInputError(
                f"logit_bias[{tok}] must be a finite number in [-100, 100], got {bias!r}")
        out.append((tok, value))
    return out


@cython.no_gc_clear  # see _engine.pxd
cdef class Sampler:
    """A llama.cpp sampler chain.

    The chain is, in order: the logit bias (``logit_bias``: token id ->
    value added to its logit, in [-100, 100]; -100 bans a token, +100 forces
    it), penalties (when any is active), then either
    greedy (``temperature <= 0``) or top-k, top-p, min-p, temperature and a
    seeded draw. A grammar is kept beside the chain and enforced by rejection
    sampling (see ``xy_sample`` in engine_support.h): the chain picks a token,
    the grammar vets only that token, and only a rejected pick costs a scan of
    the whole vocabulary. llama.cpp parses the grammar when the sampler is
    built; a grammar it cannot parse raises
    :class:`~xybrid.errors.GrammarError`.
    """


    def __cinit__(self):
        self.ptr = NULL
        self.grammar = NULL
        self.candidates = NULL

    def __init__(self, Model model not None, *, double temperature=0.0, top_k=0,
                 double top_p=1.0, double min_p=0.0, double repeat_penalty=1.0,
                 repeat_last_n=64, double frequency_penalty=0.0,
                 double presence_penalty=0.0, seed=None, grammar=None,
                 str grammar_root="root", logit_bias=None, n_ctx=None):
        model.check_open()
        # The penalty window holds at most a context's worth of tokens: -1
        # ("the whole context") is that many, and a larger window would only
        # allocate memory that can never fill. Without a context size the
        # model's training context stands in.
        cdef int32_t window_cap = checked_int(
            "n_ctx", max(model.n_ctx_train, 1) if n_ctx is None else n_ctx, 1, 0x7FFFFFFF)
        cdef int32_t ctop_k = checked_int("top_k", top_k, 0, 0x7FFFFFFF)
        cdef int32_t last_n = checked_int("repeat_last_n", repeat_last_n, -1, 0x7FFFFFFF)
        if last_n == -1 or last_n > window_cap:
            last_n = window_cap
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                            ("repeat_penalty", repeat_penalty),
                            ("frequency_penalty", frequency_penalty),
                            ("presence_penalty", presence_penalty)):
            # llama.cpp holds them as C floats: past FLT_MAX a double becomes inf.
            if not math.isfinite(value) or abs(value) > FLT_MAX:
                raise InvalidInputError(
                    f"{name} must be finite and at most {FLT_MAX:.6g} in size, got {value!r}")
        if temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
        if not 0.0 <= min_p <= 1.0:
            raise InvalidInputError(f"min_p must be in [0, 1], got {min_p}")
        if <float> repeat_penalty <= 0:
            raise InvalidInputError(f"repeat_penalty must be > 0 (1.0 disables it), got {repeat_penalty}")
        cdef uint32_t cseed = DEFAULT_SEED
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 0xFFFFFFFF:
                raise InvalidInputError(f"seed must be an integer in [0, 2**32 - 1), got {seed!r}")
            cseed = seed
        if grammar is not None and not isinstance(grammar, str):
            raise GrammarError(f"grammar must be a str of GBNF text, got {type(grammar).__name__}")
        bias_pairs = check_logit_bias(logit_bias, llama_vocab_n_tokens(model.vocab))
        self.model = model
        self.params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                           frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                           seed=seed, grammar=grammar, logit_bias=dict(bias_pairs))

        cdef llama_sampler_chain_params cparams = llama_sampler_chain_default_params()
        cparams.no_perf = True
        self.ptr = llama_sampler_chain_init(cparams)
        if self.ptr == NULL:
            raise MemoryError("llama_sampler_chain_init failed")
        self.n_vocab = llama_vocab_n_tokens(model.vocab)
        self.argmax_only = False
        cdef llama_sampler * stage
        cdef bytes bgrammar, broot
        cdef llama_logit_bias * cbias
        cdef int32_t k
        cdef int64_t n_stacks = -1
        if grammar is not None:
            # Proven able to produce output before llama.cpp sees it (empty
            # classes, token ids past the vocabulary, left recursion, rules
            # that never finish, ...): see xybrid.grammar.validate_grammar.
            from xybrid.grammar import (  # not at import: it loads typing
                MAX_GRAMMAR_STACKS, validate_grammar)

            validate_grammar(grammar, n_vocab=self.n_vocab, root=grammar_root)
            bgrammar = encode_text(grammar, "grammar")
            broot = encode_text(grammar_root, "grammar root")
            take_log_tail()
            # The work bound (see xy_shim.cpp): parse stacks at any point.
            self.grammar = xy_grammar_init(model.vocab, bgrammar, broot, MAX_GRAMMAR_STACKS,
                                           &n_stacks)
            if self.grammar == NULL:
                reason = take_log_tail()
                if n_stacks > MAX_GRAMMAR_STACKS:
                    raise GrammarError(
                        f"the grammar can start in {n_stacks} ways (llama.cpp parse stacks), "
                        f"over the limit of MAX_GRAMMAR_STACKS = {MAX_GRAMMAR_STACKS}: every "
                        f"token would be matched against each of them; factor the common "
                        f"prefixes of the alternatives out")
                raise GrammarError("llama.cpp rejected the grammar" + (f": {reason}" if reason else ""))
            self.candidates = <llama_token_data *> malloc(self.n_vocab * sizeof(llama_token_data))
            if self.candidates == NULL:
                raise MemoryError("cannot allocate the grammar candidate buffer")
        if bias_pairs:
            # The stage copies the entries; the array is ours to free.
            cbias = <llama_logit_bias *> malloc(len(bias_pairs) * sizeof(llama_logit_bias))
            if cbias == NULL:
                raise MemoryError("cannot allocate the logit bias entries")
            for k in range(len(bias_pairs)):
                cbias[k].token = bias_pairs[k][0]
                cbias[k].bias = bias_pairs[k][1]
            stage = llama_sampler_init_logit_bias(self.n_vocab, len(bias_pairs), cbias)
            free(cbias)
            self.add(stage)
        if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
            self.add(llama_sampler_init_penalties(
                llama_vocab_n_tokens(model.vocab), last_n,
                repeat_penalty, frequency_penalty, presence_penalty))
        if temperature <= 0.0:
            self.add(llama_sampler_init_greedy())
            self.argmax_only = llama_sampler_chain_n(self.ptr) == 1
            return
        if ctop_k > 0:
            self.add(llama_sampler_init_top_k(ctop_k))
        if top_p < 1.0:
            self.add(llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            self.add(llama_sampler_init_min_p(min_p, 1))
        self.add(llama_sampler_init_temp(temperature))
        self.add(llama_sampler_init_dist(cseed))

    cdef add(self, llama_sampler * stage):
        # The chain owns every stage added to it and frees them with itself.
        if stage == NULL:
            raise MemoryError("llama.cpp could not create a sampler stage")
        llama_sampler_chain_add(self.ptr, stage)

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_sampler_free(self.ptr)
            self.ptr = NULL
        if self.grammar != NULL:
            llama_sampler_free(self.grammar)
            self.grammar = NULL
        free(self.candidates)
        self.candidates = NULL

    cdef llama_token draw(self, llama_context * ctx, int32_t index) noexcept nogil:
        """Sample and accept one token (grammar enforced); -1 without logits."""
        return xy_sample(self.ptr, self.grammar, ctx, index, self.candidates, self.n_vocab,
                         self.argmax_only)

    def reset(self):
        """Forget accepted tokens (penalty history, grammar state)."""
        # Resetting a grammar stage rebuilds it from the model's vocabulary:
        # after Model.close() that would read freed memory.
        self.model.check_open()
        if (self.ptr != NULL and xy_sampler_reset(self.ptr) != 0) or (
                self.grammar != NULL and xy_sampler_reset(self.grammar) != 0):
            raise GenerationError("llama.cpp failed to reset the sampler: " + take_log_tail().strip())

    def accept(self, int token):
        """Tell the chain a token was emitted (penalties and grammar track it)."""
        self.model.check_token(token)
        cdef int rc = xy_sampler_accept(self.grammar, token) if self.grammar != NULL else 0
        if rc == -2:
            raise GrammarError(grammar_bound_message(take_log_tail().strip()))
        if rc != 0:
            raise GrammarError(f"the grammar does not allow token {token} here: "
                               + take_log_tail().strip())
        if xy_sampler_accept(self.ptr, token) != 0:
            raise GenerationError("llama.cpp failed to accept the token: " + take_log_tail().strip())

    def sample(self, Context context not None, int index=-1):
        """Sample (and accept) one token from the logits of output ``index`` of
        the last decode. A building block for step-by-step loops in Python."""
        # Not while a generation runs on the context: the loop owns its logits.
        context.check_idle()
        # llama_sampler_sample aborts the whole process (GGML_ASSERT) when the
        # requested output has no logits (nothing decoded yet, or an index
        # that the last decode did not compute); ask first and raise instead.
        if llama_get_logits_ith(context.ptr, index) == NULL:
            take_log_tail()
            raise XybridError(f"no logits for output {index} (was it requested in the last decode?)")
        cdef llama_token tok
        with nogil:
            tok = self.draw(context.ptr, index)
        if tok == XY_SAMPLE_GRAMMAR_BLOCKED:
            raise GrammarError("the grammar allows no token of this vocabulary at this point")
        if tok == XY_SAMPLE_GRAMMAR_TOO_COMPLEX:
            raise GrammarError(grammar_bound_message(take_log_tail().strip()))
        if tok == XY_SAMPLE_EXCEPTION:
            raise GenerationError("llama.cpp failed while sampling: " + take_log_tail().strip())
        if tok < 0:
            raise GenerationError("sampling found no candidate token")
        return tok

    def admitted(self):
        """The token ids the grammar admits next (all of them without a
        grammar): the grammar stage, strict UTF-8 included, applied to the
        whole vocabulary. For tests and diagnostics; costs a full scan."""
        self.model.check_open()
        if self.grammar == NULL:
            return list(range(self.n_vocab))
        cdef int32_t i
        for i in range(self.n_vocab):
            self.candidates[i].id = i
            self.candidates[i].logit = 0.0
            self.candidates[i].p = 0.0
        cdef llama_token_data_array arr
        arr.data = self.candidates
        arr.size = self.n_vocab
        arr.selected = -1
        arr.sorted = False
        take_log_tail()
        cdef int rc = xy_sampler_apply(self.grammar, &arr)
        if rc == -2:
            raise GrammarError(grammar_bound_message(take_log_tail().strip()))
        if rc != 0:
            raise GenerationError("llama.cpp failed while applying the grammar: "
                                  + take_log_tail().strip())
        return [self.candidates[i].id for i in range(self.n_vocab)
                if self.candidates[i].logit != -math.inf]

    @property
    def grammar_stats(self):
        """``{"stacks": parse stacks now}``, or ``None`` without a grammar.
        See :data:`xybrid.grammar.MAX_GRAMMAR_STACKS`."""
        cdef int64_t n_stacks = 0
        if self.grammar == NULL or xy_grammar_stats(self.grammar, &n_stacks) != 0:
            return None
        return {"stacks": n_stacks}

    @property
    def n_stages(self):
        return llama_sampler_chain_n(self.ptr)


def grammar_bound_message(detail):
    """The GrammarError text for a request ended by the grammar's stack bound."""
    from xybrid.grammar import MAX_GRAMMAR_STACKS
    return ("the grammar passed its work bound (MAX_GRAMMAR_STACKS = "
            f"{MAX_GRAMMAR_STACKS} parse stacks): it is too ambiguous or branches "
            "too widely to be enforced at a bounded cost per token"
            + (f" ({detail})" if detail else ""))
