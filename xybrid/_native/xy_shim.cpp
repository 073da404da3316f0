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
#include <stdexcept>
#include <string>

// llama.cpp's internal grammar API (llama_grammar_init_impl, _apply_impl,
// _accept, ...): exported by libllama, declared only in this header of the
// pinned source. The engine owns its grammar through these (see xy_grammar
// below) so that it can bound the parse stacks and hold pieces to UTF-8.
#include "llama-grammar.h"

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

// ---------------------------------------------------------------------------
// The grammar stage: llama.cpp's grammar, owned here.
//
// Two things llama.cpp's own grammar sampler does not do:
//
// - Bounded stacks. llama.cpp keeps one parse stack per way the text so far
//   can continue, and every token costs work in proportion to that count
//   (each candidate of the vocabulary is matched against every stack). A
//   grammar with thousands of alternatives at one position, or an ambiguous
//   one whose stacks multiply as text arrives, makes each token hundreds of
//   times slower. The count is checked after the grammar is built and after
//   every accepted code point; past `max_stacks` the request ends
//   (stack_bound_exceeded, turned into XY_SAMPLE_GRAMMAR_TOO_COMPLEX).
//   llama.cpp's candidate matching itself (llama_grammar_apply_impl) is not
//   counted: it explores every reading of a piece, which for a repetition
//   of something that can match nothing is exponential in the piece length
//   while the stack count stays small; xybrid.grammar.validate_grammar
//   refuses those grammars before they get here.
// - Strict UTF-8. llama.cpp decodes token pieces leniently: a lead byte
//   F5..FF, an overlong form (C0 80, E0 80 80), a UTF-16 surrogate (ED A0 80)
//   or a code point past U+10FFFF passes any "." or negated class, and the
//   reply then holds bytes that are not UTF-8. Each admitted piece is checked
//   against a UTF-8 automaton continuing from the bytes accepted so far.

// States of the UTF-8 automaton: what the next byte must be.
enum : uint8_t {
    U8_START = 0,  // at a character boundary
    U8_TAIL1,      // one more continuation byte (80..BF)
    U8_TAIL2,      // two more
    U8_TAIL3,      // three more
    U8_E0,         // after E0: A0..BF, then one more
    U8_ED,         // after ED: 80..9F (no surrogates), then one more
    U8_F0,         // after F0: 90..BF, then two more
    U8_F4,         // after F4: 80..8F (nothing past U+10FFFF), then two more
    U8_BAD,        // not UTF-8
};

uint8_t utf8_step(uint8_t state, unsigned char b) {
    auto in = [b](unsigned lo, unsigned hi) { return lo <= b && b <= hi; };
    switch (state) {
    case U8_START:
        if (b < 0x80) return U8_START;
        if (in(0xC2, 0xDF)) return U8_TAIL1;
        if (b == 0xE0) return U8_E0;
        if (b == 0xED) return U8_ED;
        if (in(0xE1, 0xEF)) return U8_TAIL2;
        if (b == 0xF0) return U8_F0;
        if (in(0xF1, 0xF3)) return U8_TAIL3;
        if (b == 0xF4) return U8_F4;
        return U8_BAD;
    case U8_TAIL1: return in(0x80, 0xBF) ? U8_START : U8_BAD;
    case U8_TAIL2: return in(0x80, 0xBF) ? U8_TAIL1 : U8_BAD;
    case U8_TAIL3: return in(0x80, 0xBF) ? U8_TAIL2 : U8_BAD;
    case U8_E0: return in(0xA0, 0xBF) ? U8_TAIL1 : U8_BAD;
    case U8_ED: return in(0x80, 0x9F) ? U8_TAIL1 : U8_BAD;
    case U8_F0: return in(0x90, 0xBF) ? U8_TAIL2 : U8_BAD;
    case U8_F4: return in(0x80, 0x8F) ? U8_TAIL2 : U8_BAD;
    default: return U8_BAD;
    }
}

uint8_t utf8_run(uint8_t state, const std::string &bytes) {
    for (unsigned char b : bytes) {
        state = utf8_step(state, b);
        if (state == U8_BAD) break;
    }
    return state;
}

// A bound of the grammar's work was passed: the request ends with
// XY_SAMPLE_GRAMMAR_TOO_COMPLEX (never reaches Python as an exception).
struct stack_bound_exceeded : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct xy_grammar {
    const llama_vocab *vocab;
    std::string text;
    std::string root;
    size_t max_stacks;
    llama_grammar *grammar;
    uint8_t utf8;  // automaton state after the accepted pieces
};

// The piece llama.cpp's grammar matches for a token (special tokens as text).
std::string grammar_piece(const llama_vocab *vocab, llama_token id) {
    char small[128];
    int32_t n = llama_token_to_piece(vocab, id, small, sizeof(small), 0, true);
    if (n >= 0) return std::string(small, (size_t)n);
    std::string big((size_t)-n, '\0');
    n = llama_token_to_piece(vocab, id, &big[0], (int32_t)big.size(), 0, true);
    if (n < 0) throw std::runtime_error("token_to_piece: piece does not fit");
    big.resize((size_t)n);
    return big;
}

void check_stacks(const xy_grammar &g) {
    if (g.grammar->stacks.size() > g.max_stacks) {
        throw stack_bound_exceeded("the grammar has " + std::to_string(g.grammar->stacks.size()) +
                                   " parse stacks, over the limit of " + std::to_string(g.max_stacks));
    }
}

const char *xy_grammar_name(const llama_sampler *) { return "xybrid-grammar"; }

// Code points of a piece known to be UTF-8 continuing the grammar's pending
// partial character; 0-terminated, the new partial character in *value / *remain.
void decode_piece(const std::string &piece, llama_partial_utf8 pending, std::vector<uint32_t> &out,
                  uint32_t *value_out, int *remain_out) {
    uint32_t value = pending.value;
    int remain = pending.n_remain > 0 ? pending.n_remain : 0;
    for (unsigned char b : piece) {
        if (remain > 0) {
            value = (value << 6) | (b & 0x3Fu);
            remain--;
        } else if (b < 0x80) {
            value = b;
        } else if (b < 0xE0) {
            value = b & 0x1Fu;
            remain = 1;
        } else if (b < 0xF0) {
            value = b & 0x0Fu;
            remain = 2;
        } else {
            value = b & 0x07u;
            remain = 3;
        }
        if (remain == 0) out.push_back(value);
    }
    out.push_back(0);
    *value_out = remain > 0 ? value : 0;
    *remain_out = remain;
}

void xy_grammar_apply(llama_sampler *smpl, llama_token_data_array *cur) {
    auto *g = (xy_grammar *)smpl->ctx;
    llama_grammar_apply_impl(*g->grammar, cur);
    // Then strict UTF-8: what llama.cpp admitted must continue the bytes so far.
    for (size_t i = 0; i < cur->size; i++) {
        llama_token_data &c = cur->data[i];
        if (!allowed(c.logit) || llama_vocab_is_eog(g->vocab, c.id)) continue;
        if (utf8_run(g->utf8, grammar_piece(g->vocab, c.id)) == U8_BAD) c.logit = -INFINITY;
    }
}

bool token_at_top(const llama_grammar &grammar) {
    for (const auto &stack : grammar.stacks) {
        if (!stack.empty() && (stack.back()->type == LLAMA_GRETYPE_TOKEN ||
                               stack.back()->type == LLAMA_GRETYPE_TOKEN_NOT)) {
            return true;
        }
    }
    return false;
}

bool any_complete(const llama_grammar &grammar) {
    for (const auto &stack : grammar.stacks) {
        if (stack.empty()) return true;
    }
    return false;
}

// Accept a token one code point at a time, the stack count checked after
// each: llama.cpp's own accept walks every stack through the whole piece
// before it looks at the count, so one token of an ambiguous grammar could
// already cost exponential work. Token elements (<[id]>) at the top of a
// stack, and pieces that are not UTF-8 here (only Sampler.accept can bring
// one), go through llama.cpp's accept as they are.
void xy_grammar_accept(llama_sampler *smpl, llama_token token) {
    auto *g = (xy_grammar *)smpl->ctx;
    llama_grammar &grammar = *g->grammar;
    if (llama_vocab_is_eog(g->vocab, token)) {
        // llama.cpp aborts the process on an end token the grammar does not allow.
        if (!any_complete(grammar)) throw std::runtime_error("the grammar is not complete at an end-of-generation token");
        return;
    }
    const std::string piece = grammar_piece(g->vocab, token);
    const uint8_t after = utf8_run(g->utf8, piece);
    if (after == U8_BAD || token_at_top(grammar)) {
        llama_grammar_accept_impl(grammar, token);
        if (after != U8_BAD) {
            g->utf8 = after;
        } else {
            // Follow llama.cpp's own idea of a pending partial character.
            const int left = grammar.partial_utf8.n_remain;
            g->utf8 = left == 1 ? U8_TAIL1 : left == 2 ? U8_TAIL2 : left == 3 ? U8_TAIL3 : U8_START;
        }
        check_stacks(*g);
        return;
    }
    // The piece is UTF-8 continuing the pending partial character, if any:
    // one code point at a time, as llama.cpp decodes it.
    std::vector<uint32_t> cps;
    uint32_t value = 0;
    int remain = 0;
    decode_piece(piece, grammar.partial_utf8, cps, &value, &remain);
    for (size_t k = 0; cps[k] != 0; k++) {
        llama_grammar_accept(&grammar, cps[k]);
        if (grammar.stacks.empty()) {
            throw std::runtime_error("the grammar does not allow the piece of token " + std::to_string(token));
        }
        check_stacks(*g);
    }
    grammar.partial_utf8 = llama_partial_utf8{value, remain};
    g->utf8 = after;
}

llama_grammar *build_grammar(const llama_vocab *vocab, const std::string &text, const std::string &root) {
    return llama_grammar_init_impl(vocab, text.c_str(), root.c_str(), false, nullptr, 0, nullptr, 0);
}

void xy_grammar_reset(llama_sampler *smpl) {
    auto *g = (xy_grammar *)smpl->ctx;
    llama_grammar *fresh = build_grammar(g->vocab, g->text, g->root);
    if (fresh == nullptr) throw std::runtime_error("the grammar could not be rebuilt");
    llama_grammar_free_impl(g->grammar);
    g->grammar = fresh;
    g->utf8 = U8_START;
}

void xy_grammar_free(llama_sampler *smpl) {
    auto *g = (xy_grammar *)smpl->ctx;
    if (g == nullptr) return;
    if (g->grammar != nullptr) llama_grammar_free_impl(g->grammar);
    delete g;
}

llama_sampler_i xy_grammar_iface = {
    /* .name              = */ xy_grammar_name,
    /* .accept            = */ xy_grammar_accept,
    /* .apply             = */ xy_grammar_apply,
    /* .reset             = */ xy_grammar_reset,
    /* .clone             = */ nullptr,
    /* .free              = */ xy_grammar_free,
    /* .backend_init      = */ nullptr,
    /* .backend_accept    = */ nullptr,
    /* .backend_apply     = */ nullptr,
    /* .backend_set_input = */ nullptr,
    /* .backend_reset     = */ nullptr,
    /* .copy_state        = */ nullptr,
};

llama_sampler *grammar_init(const llama_vocab *vocab, const char *text, const char *root, size_t max_stacks,
                            int64_t *n_stacks) {
    *n_stacks = -1;
    auto *g = new xy_grammar{vocab, text, root, max_stacks, nullptr, U8_START};
    llama_sampler *smpl = nullptr;
    try {
        g->grammar = build_grammar(vocab, g->text, g->root);
        if (g->grammar != nullptr) {
            *n_stacks = (int64_t)g->grammar->stacks.size();
            if (g->grammar->stacks.size() <= max_stacks) smpl = llama_sampler_init(&xy_grammar_iface, g);
        }
    } catch (...) {
        if (g->grammar != nullptr) llama_grammar_free_impl(g->grammar);
        delete g;
        throw;
    }
    if (smpl == nullptr) {
        if (g->grammar != nullptr) llama_grammar_free_impl(g->grammar);
        delete g;
    }
    return smpl;
}

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

// guarded(), with a passed grammar bound answered by `too_complex` (the
// caller's "grammar too complex" code) instead of the generic failure.
template <typename R, typename F>
R grammar_bounded(const char *where, R failed, R too_complex, F &&f) noexcept {
    return guarded(where, failed, [&]() -> R {
        try {
            return f();
        } catch (const stack_bound_exceeded &e) {
            report("grammar", e.what());
            return too_complex;
        }
    });
}

}  // namespace

extern "C" {

llama_token xy_sample(llama_sampler *chain, llama_sampler *grammar, llama_context *ctx, int32_t idx,
                      llama_token_data *cur, int32_t n_vocab, int argmax) {
    return grammar_bounded("sampling", (llama_token)XY_SAMPLE_EXCEPTION,
                           (llama_token)XY_SAMPLE_GRAMMAR_TOO_COMPLEX,
                           [&] { return sample(chain, grammar, ctx, idx, cur, n_vocab, argmax); });
}

llama_sampler *xy_grammar_init(const llama_vocab *vocab, const char *grammar, const char *root,
                               int64_t max_stacks, int64_t *n_stacks) {
    *n_stacks = -1;
    if (max_stacks < 1) return nullptr;
    return guarded("grammar", (llama_sampler *)nullptr, [&] {
        return grammar_init(vocab, grammar, root, (size_t)max_stacks, n_stacks);
    });
}

int xy_grammar_stats(llama_sampler *grammar, int64_t *n_stacks) {
    if (grammar == nullptr || grammar->iface != &xy_grammar_iface) return -1;
    const auto *g = (const xy_grammar *)grammar->ctx;
    *n_stacks = (int64_t)g->grammar->stacks.size();
    return 0;
}

int xy_sampler_accept(llama_sampler *smpl, llama_token token) {
    return grammar_bounded("sampler accept", -1, -2, [&] {
        llama_sampler_accept(smpl, token);
        return 0;
    });
}

int xy_sampler_apply(llama_sampler *smpl, llama_token_data_array *cur) {
    return grammar_bounded("sampler apply", -1, -2, [&] {
        llama_sampler_apply(smpl, cur);
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
