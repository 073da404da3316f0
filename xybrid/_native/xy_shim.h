/* The C++ exception boundary (xy_shim.cpp): every llama.cpp call that can
 * throw is made through one of these, which never throw. */
#ifndef XYBRID_SHIM_H
#define XYBRID_SHIM_H

#include <stddef.h>
#include <stdint.h>

#include "llama.h"

/* xy_sample's results below zero. */
#define XY_SAMPLE_NO_LOGITS (-1)       /* no logits for that output row */
#define XY_SAMPLE_GRAMMAR_BLOCKED (-2) /* the grammar allows no token here */
#define XY_SAMPLE_EXCEPTION (-3)       /* llama.cpp threw (message in the log tail) */
#define XY_SAMPLE_GRAMMAR_TOO_COMPLEX (-4) /* the grammar's parse stacks passed their bound */

/* The other wrappers return this when llama.cpp threw: no real result of
 * theirs is this negative. */
#define XY_CALL_FAILED INT32_MIN

#ifdef __cplusplus
extern "C" {
#endif

/* Sample and accept one token from output row idx, the grammar (may be NULL)
 * enforced. cur must hold n_vocab entries when grammar is set. A token id, or
 * one of the XY_SAMPLE_* codes. */
llama_token xy_sample(struct llama_sampler *chain, struct llama_sampler *grammar,
                      struct llama_context *ctx, int32_t idx, llama_token_data *cur,
                      int32_t n_vocab, int argmax);
/* A grammar stage (llama.cpp's grammar with the parse-stack bound and
 * strict UTF-8 pieces, see xy_shim.cpp); NULL when llama.cpp refuses or
 * throws, or when the grammar starts with more than max_stacks parse stacks.
 * *n_stacks: the stacks it starts with, -1 when it was not built. */
struct llama_sampler *xy_grammar_init(const struct llama_vocab *vocab, const char *grammar,
                                      const char *root, int64_t max_stacks, int64_t *n_stacks);
/* A stage from xy_grammar_init: its parse stacks now. 0, or -1 for any
 * other sampler. */
int xy_grammar_stats(struct llama_sampler *grammar, int64_t *n_stacks);
/* 0, -1 when llama.cpp threw, -2 (xy_sampler_accept on a grammar stage) when
 * the token took the parse stacks past their bound. */
int xy_sampler_accept(struct llama_sampler *smpl, llama_token token);
int xy_sampler_reset(struct llama_sampler *smpl);
/* llama_sampler_apply; 0, -1 when llama.cpp threw, -2 when a grammar stage
 * passed its work bound. */
int xy_sampler_apply(struct llama_sampler *smpl, llama_token_data_array *cur);
/* As llama.cpp's functions of the same name, or XY_CALL_FAILED. */
int32_t xy_tokenize(const struct llama_vocab *vocab, const char *text, int32_t text_len,
                    llama_token *tokens, int32_t n_tokens_max, int add_special, int parse_special);
int32_t xy_token_to_piece(const struct llama_vocab *vocab, llama_token token, char *buf,
                          int32_t length, int32_t lstrip, int special);
int32_t xy_detokenize(const struct llama_vocab *vocab, const llama_token *tokens, int32_t n_tokens,
                      char *text, int32_t text_len_max, int remove_special, int unparse_special);
int32_t xy_chat_apply_template(const char *tmpl, const struct llama_chat_message *chat, size_t n_msg,
                               int add_ass, char *buf, int32_t length);

#ifdef __cplusplus
}
#endif

#endif
