// C++ boundary for the llama.cpp calls that can throw.
//
// llama.h is a C interface, but llama.cpp is C++ and some of its entry points
// let exceptions escape: the grammar sampler throws std::runtime_error when a
// token leaves it with no live parse stack, the tokenizer and the piece
// lookups use std::vector::at, and anything can throw std::bad_alloc. The
// engine calls them from C (Cython output) and often from a nogil loop on a
// native thread; an exception unwinding into those frames is std::terminate,
// i.e. the interpreter dies. Every such call goes through a function here
// instead: it catches everything and turns it into an error code, and sends
// the exception's message to llama.cpp's log sink (the engine keeps the last
// errors there and puts them into the Python exception it raises).
//
// Nothing here takes the GIL or touches Python objects.

#include <cmath>
#include <cstdio>
#include <exception>
#include <new>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xy_shim.h"

namespace {

void report(const char *where, const char *what) {
    ggml_log_callback cb = nullptr;
    void *user_data = nullptr;
    llama_log_get(&cb, &user_data);
    if (cb == nullptr) return;
    char line[512];
    std::snprintf(line, sizeof(line), "%s: %s\n", where, what ? what : "unknown C++ exception");
    cb(GGML_LOG_LEVEL_ERROR, line, user_data);
}

// Run f(); on any C++ exception report it and return `failed`.
template <typename R, typename F>
R guarded(const char *where, R failed, F &&f) noexcept {
    try {
        return f();
    } catch (const std::bad_alloc &) {
        report(where, "out of memory");
    } catch (const std::exception &e) {
        report(where, e.what());
    } catch (...) {
        report(where, nullptr);
    }
    return failed;
}

void fill_candidates(llama_token_data *cur, const float *logits, int32_t n_vocab) {
    for (int32_t i = 0; i < n_vocab; i++) {
        cur[i].id = i;
        cur[i].logit = logits[i];
        cur[i].p = 0.0f;
    }
}

// Index of the first largest value (NaN never wins; all NaN: 0). Two passes:
// the maximum, then its first position. Written with SSE2 where there is
// SSE2 (every x86-64), because the one-pass form `if (x[i] > x[best])` does
// not vectorize: on a 262k vocabulary it is ~2x slower, and the scheduler
// runs it once per sequence per step on one core while the others wait.
int32_t first_max(const float *x, int32_t n) {
    int32_t i = 0;
    float top = -INFINITY;
#if defined(__SSE2__)
    __m128 m0 = _mm_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    // _mm_max_ps(a, m) is `a > m ? a : m`, so a NaN in `a` leaves m alone.
    for (; i + 16 <= n; i += 16) {
        m0 = _mm_max_ps(_mm_loadu_ps(x + i), m0);
        m1 = _mm_max_ps(_mm_loadu_ps(x + i + 4), m1);
        m2 = _mm_max_ps(_mm_loadu_ps(x + i + 8), m2);
        m3 = _mm_max_ps(_mm_loadu_ps(x + i + 12), m3);
    }
    float lanes[4];
    _mm_storeu_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
    for (float v : lanes) top = v > top ? v : top;
#endif
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    if (!(top > -INFINITY)) {
        // Every value is -inf or NaN: the scalar rule's answer.
        int32_t best = 0;
        for (int32_t j = 1; j < n; j++) {
            if (x[j] > x[best]) best = j;
        }
        return best;
    }
    int32_t j = 0;
#if defined(__SSE2__)
    const __m128 t = _mm_set1_ps(top);
    for (; j + 4 <= n; j += 4) {
        int mask = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + j), t));
        if (mask != 0) return j + __builtin_ctz(mask);
    }
#endif
    for (; j < n; j++) {
        if (x[j] == top) return j;
    }
    return 0;  // not reached: `top` is one of the values
}

bool allowed(float logit) { return !(std::isinf(logit) && logit < 0); }

llama_token sample(llama_sampler *chain, llama_sampler *grammar, llama_context *ctx, int32_t idx,
                   llama_token_data *cur, int32_t n_vocab, int argmax) {
    if (argmax && grammar == nullptr) {
        // A greedy-only chain picks the first largest logit; scanning the row
        // does that without building an n_vocab candidate array.
        const float *logits = llama_get_logits_ith(ctx, idx);
        if (logits == nullptr || n_vocab <= 0) return XY_SAMPLE_NO_LOGITS;
        return first_max(logits, n_vocab);
    }
    if (grammar == nullptr || cur == nullptr) return llama_sampler_sample(chain, ctx, idx);
    const float *logits = llama_get_logits_ith(ctx, idx);
    if (logits == nullptr) return XY_SAMPLE_NO_LOGITS;
    // Rejection sampling: let the plain chain pick, ask the grammar about that
    // one token, and only when it refuses apply the grammar to the whole
    // vocabulary (the same constrained distribution, at a fraction of the cost).
    fill_candidates(cur, logits, n_vocab);
    llama_token_data_array all = {cur, (size_t)n_vocab, -1, false};
    llama_sampler_apply(chain, &all);
    llama_token id = (all.selected >= 0 && (size_t)all.selected < all.size)
                         ? all.data[all.selected].id : -1;
    bool ok = false;
    if (id >= 0) {
        llama_token_data one = {id, 1.0f, 0.0f};
        llama_token_data_array single = {&one, 1, -1, false};
        llama_sampler_apply(grammar, &single);
        ok = allowed(one.logit);
    }
    if (!ok) {
        fill_candidates(cur, logits, n_vocab);
        llama_token_data_array again = {cur, (size_t)n_vocab, -1, false};
        llama_sampler_apply(grammar, &again);
        size_t n_allowed = 0;
        for (size_t i = 0; i < again.size; i++) n_allowed += allowed(again.data[i].logit);
        // A grammar that allows no token here would make the chain pick a
        // refused one, and accepting it aborts inside llama.cpp (an
        // end-of-generation token) or throws (any other): stop instead.
        if (n_allowed == 0) return XY_SAMPLE_GRAMMAR_BLOCKED;
        llama_sampler_apply(chain, &again);
        if (again.selected < 0 || (size_t)again.selected >= again.size) return XY_SAMPLE_NO_LOGITS;
        if (!allowed(again.data[again.selected].logit)) return XY_SAMPLE_GRAMMAR_BLOCKED;
        id = again.data[again.selected].id;
    }
    llama_sampler_accept(grammar, id);
    llama_sampler_accept(chain, id);
    return id;
}

}  // namespace

extern "C" {

llama_token xy_sample(llama_sampler *chain, llama_sampler *grammar, llama_context *ctx, int32_t idx,
                      llama_token_data *cur, int32_t n_vocab, int argmax) {
    return guarded("sampling", (llama_token)XY_SAMPLE_EXCEPTION,
                   [&] { return sample(chain, grammar, ctx, idx, cur, n_vocab, argmax); });
}

llama_sampler *xy_grammar_init(const llama_vocab *vocab, const char *grammar, const char *root) {
    return guarded("grammar", (llama_sampler *)nullptr,
                   [&] { return llama_sampler_init_grammar(vocab, grammar, root); });
}

int xy_sampler_accept(llama_sampler *smpl, llama_token token) {
    return guarded("sampler accept", -1, [&] {
        llama_sampler_accept(smpl, token);
        return 0;
    });
}

int xy_sampler_reset(llama_sampler *smpl) {
    return guarded("sampler reset", -1, [&] {
        llama_sampler_reset(smpl);
        return 0;
    });
}

int32_t xy_tokenize(const llama_vocab *vocab, const char *text, int32_t text_len, llama_token *tokens,
                    int32_t n_tokens_max, int add_special, int parse_special) {
    return guarded("tokenize", (int32_t)XY_CALL_FAILED, [&] {
        return llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special != 0,
                              parse_special != 0);
    });
}

int32_t xy_token_to_piece(const llama_vocab *vocab, llama_token token, char *buf, int32_t length,
                          int32_t lstrip, int special) {
    return guarded("token_to_piece", (int32_t)XY_CALL_FAILED, [&] {
        return llama_token_to_piece(vocab, token, buf, length, lstrip, special != 0);
    });
}

int32_t xy_detokenize(const llama_vocab *vocab, const llama_token *tokens, int32_t n_tokens, char *text,
                      int32_t text_len_max, int remove_special, int unparse_special) {
    return guarded("detokenize", (int32_t)XY_CALL_FAILED, [&] {
        return llama_detokenize(vocab, tokens, n_tokens, text, text_len_max, remove_special != 0,
                                unparse_special != 0);
    });
}

int32_t xy_chat_apply_template(const char *tmpl, const llama_chat_message *chat, size_t n_msg, int add_ass,
                               char *buf, int32_t length) {
    return guarded("chat template", (int32_t)XY_CALL_FAILED, [&] {
        return llama_chat_apply_template(tmpl, chat, n_msg, add_ass != 0, buf, length);
    });
}

}  // extern "C"
