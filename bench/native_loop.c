/* native_loop: the "as fast as it can be" reference of the xybrid benchmark.
 *
 * A plain C loop over the very llama.cpp libraries that xybrid installed
 * (the harness compiles this file at bench time and links it with an rpath
 * to xybrid/_native/, so it loads exactly those .so files):
 *
 *     tokenize (or read token ids) -> prefill in n_batch chunks ->
 *     sample -> end-of-generation check -> piece -> decode -> ...
 *
 * It sets llama.cpp up the way xybrid's engine does (default model and
 * context parameters, mmap, the same sampler chain) and prints one JSON object
 * on stdout: timings in CLOCK_MONOTONIC nanoseconds (the clock of Python's
 * time.monotonic_ns / perf_counter_ns on Linux), the sampled tokens and peak
 * RSS from getrusage.
 *
 * Modes:
 *   generate   (default) --reps measured generations of --n-predict tokens,
 *              each from an empty cache, after --warmup tokens of warm-up.
 *   multiturn  the prompt is a conversation whose first --prefix-len tokens
 *              were the previous turn: decode the prefix once (turn 1), then
 *              time "first token of turn 2" --reps times with the prefix kept
 *              in the cache (seq_rm of the rest) and --reps-cleared times
 *              (default: --reps) after clearing the cache.
 *
 *   --serve    load, warm up, print {"ready": ...}, then obey one command per
 *              stdin line, answering one JSON line each (the benchmark harness
 *              drives all contestants this way, alternating them run by run):
 *                generate [busy]        one generation (busy: with a spinning thread)
 *                turn1                  decode the first --prefix-len tokens
 *                turn2 reuse|cleared    time the first token of the whole prompt
 *                exit                   answer {"maxrss_kb": ...} and quit
 *
 * --busy-thread starts a thread that spins on the CPU during the measured
 * runs: the CPU contention that a busy Python thread causes, without a GIL.
 */
#define _GNU_SOURCE /* RUSAGE_THREAD */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "ggml-backend.h"
#include "llama.h"

typedef struct llama_model llama_model;
typedef struct llama_context llama_context;
typedef struct llama_vocab llama_vocab;
typedef struct llama_sampler llama_sampler;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "native_loop: %s\n", msg);
    exit(2);
}

/* Errors only (a continuation line follows the level of the line before it). */
static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    static enum ggml_log_level last = GGML_LOG_LEVEL_NONE;
    (void)user;
    if (level != GGML_LOG_LEVEL_CONT) last = level;
    if (last == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* ---- options ---------------------------------------------------------- */

typedef struct {
    const char *model;
    const char *tokens_file;
    const char *prompt;
    const char *mode;
    const char *grammar_file;
    int n_predict, n_threads, n_ctx, n_batch, n_ubatch, top_k, warmup, reps, reps_cleared, prefix_len;
    float temp, top_p, min_p;
    uint32_t seed;
    int flash_attn, ignore_eos, busy_thread, no_mmap, serve;
} opts_t;

static void usage(void) {
    fprintf(stderr,
            "usage: native_loop --model PATH (--tokens FILE | --prompt TEXT) [--mode generate|multiturn]\n"
            "  [--n-predict N] [--threads N] [--ctx N] [--batch N] [--ubatch N]\n"
            "  [--temp F] [--top-k N] [--top-p F] [--min-p F] [--seed N] [--flash-attn]\n"
            "  [--ignore-eos] [--warmup N] [--reps N] [--reps-cleared N] [--prefix-len N] [--busy-thread] [--no-mmap]\n"
            "  [--grammar GBNF_FILE]\n"
            "  [--serve]\n");
    exit(2);
}

static void parse(int argc, char **argv, opts_t *o) {
    memset(o, 0, sizeof(*o));
    o->mode = "generate";
    o->n_predict = 256;
    o->n_threads = 2;
    o->n_ctx = 2048;
    o->n_batch = 512;
    o->n_ubatch = 512;
    o->top_p = 1.0f;
    o->seed = 0xFFFFFFFFu;
    o->reps = 1;
    o->reps_cleared = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && (v || (usage(), 0)) && ++i)
        if (ARG("--model")) o->model = v;
        else if (ARG("--tokens")) o->tokens_file = v;
        else if (ARG("--prompt")) o->prompt = v;
        else if (ARG("--mode")) o->mode = v;
        else if (ARG("--grammar")) o->grammar_file = v;
        else if (ARG("--n-predict")) o->n_predict = atoi(v);
        else if (ARG("--threads")) o->n_threads = atoi(v);
        else if (ARG("--ctx")) o->n_ctx = atoi(v);
        else if (ARG("--batch")) o->n_batch = atoi(v);
        else if (ARG("--ubatch")) o->n_ubatch = atoi(v);
        else if (ARG("--temp")) o->temp = strtof(v, NULL);
        else if (ARG("--top-k")) o->top_k = atoi(v);
        else if (ARG("--top-p")) o->top_p = strtof(v, NULL);
        else if (ARG("--min-p")) o->min_p = strtof(v, NULL);
        else if (ARG("--seed")) o->seed = (uint32_t)strtoul(v, NULL, 10);
        else if (ARG("--warmup")) o->warmup = atoi(v);
        else if (ARG("--reps")) o->reps = atoi(v);
        else if (ARG("--reps-cleared")) o->reps_cleared = atoi(v);
        else if (ARG("--prefix-len")) o->prefix_len = atoi(v);
        else if (strcmp(a, "--flash-attn") == 0) o->flash_attn = 1;
        else if (strcmp(a, "--ignore-eos") == 0) o->ignore_eos = 1;
        else if (strcmp(a, "--busy-thread") == 0) o->busy_thread = 1;
        else if (strcmp(a, "--no-mmap") == 0) o->no_mmap = 1;
        else if (strcmp(a, "--serve") == 0) o->serve = 1;
        else usage();
#undef ARG
    }
    if (!o->model || (!o->tokens_file && !o->prompt)) usage();
    if (o->reps_cleared < 0) o->reps_cleared = o->reps;
    if (o->n_predict < 1 || o->reps < 1 || o->n_threads < 1) usage();
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open the grammar file");
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf) die("out of memory");
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 == cap && !(buf = realloc(buf, cap *= 2))) die("out of memory");
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
}

static llama_token *read_tokens(const char *path, int *n_out) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open the tokens file");
    int cap = 1024, n = 0;
    llama_token *t = malloc(cap * sizeof(*t));
    long v;
    int c;
    /* Whitespace, commas or brackets between integers (a JSON list works). */
    while ((c = fgetc(f)) != EOF) {
        if ((c >= '0' && c <= '9') || c == '-') {
            ungetc(c, f);
            if (fscanf(f, "%ld", &v) != 1) die("bad tokens file");
            if (n == cap) t = realloc(t, (cap *= 2) * sizeof(*t));
            t[n++] = (llama_token)v;
        }
    }
    fclose(f);
    *n_out = n;
    return t;
}

/* ---- the loop ------------------------------------------------------------ */

typedef struct {
    llama_context *ctx;
    const llama_vocab *vocab;
    llama_sampler *smpl;
    llama_batch batch;
    int n_batch;
} engine_t;

/* Decode tokens at positions pos0.. in n_batch chunks; logits for the last one. */
static int decode(engine_t *e, const llama_token *toks, int n, int pos0) {
    for (int off = 0; off < n;) {
        int m = n - off < e->n_batch ? n - off : e->n_batch;
        for (int i = 0; i < m; i++) {
            e->batch.token[i] = toks[off + i];
            e->batch.pos[i] = pos0 + off + i;
            e->batch.n_seq_id[i] = 1;
            e->batch.seq_id[i][0] = 0;
            e->batch.logits[i] = off + i == n - 1;
        }
        e->batch.n_tokens = m;
        int rc = llama_decode(e->ctx, e->batch);
        if (rc != 0) return rc;
        off += m;
    }
    return 0;
}

typedef struct {
    int64_t t_start, t_prefill_end, t_end;
    int n_out;
    llama_token *tokens;
    int64_t *token_ns;
    char *text;
    size_t text_len, text_cap;
    const char *stop_reason;
    /* The loop thread's CPU time and context switches (waits: voluntary,
     * preemptions: involuntary) over the run, as xybrid's GenerationResult
     * reports them; -1 where unknown. */
    int64_t cpu_ns, waits, preemptions;
} run_t;

typedef struct {
    int64_t cpu_ns, waits, preemptions;
} usage_t;

static int thread_usage(usage_t *u) {
    struct timespec ts;
    struct rusage ru;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0 || getrusage(RUSAGE_THREAD, &ru) != 0) return -1;
    u->cpu_ns = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    u->waits = ru.ru_nvcsw;
    u->preemptions = ru.ru_nivcsw;
    return 0;
}

static void run_generate(engine_t *e, const llama_token *prompt, int n_prompt, int n_predict,
                         int ignore_eos, run_t *r) {
    memset(r, 0, sizeof(*r));
    r->tokens = malloc(n_predict * sizeof(llama_token));
    r->token_ns = malloc(n_predict * sizeof(int64_t));
    r->text_cap = 4096;
    r->text = malloc(r->text_cap);
    llama_memory_clear(llama_get_memory(e->ctx), true);
    llama_sampler_reset(e->smpl);

    usage_t u0, u1;
    int usage_ok = thread_usage(&u0) == 0;
    r->t_start = now_ns();
    if (decode(e, prompt, n_prompt, 0) != 0) die("prefill failed");
    r->t_prefill_end = now_ns();
    int n_past = n_prompt;
    r->stop_reason = "length";
    for (;;) {
        llama_token tok = llama_sampler_sample(e->smpl, e->ctx, -1);
        int64_t t = now_ns();
        if (!ignore_eos && llama_vocab_is_eog(e->vocab, tok)) {
            r->stop_reason = "eog";
            break;
        }
        r->token_ns[r->n_out] = t;
        r->tokens[r->n_out++] = tok;
        char piece[256];
        int n = llama_token_to_piece(e->vocab, tok, piece, sizeof(piece), 0, false);
        if (n > 0) {
            if (r->text_len + (size_t)n + 1 > r->text_cap) r->text = realloc(r->text, r->text_cap *= 2);
            memcpy(r->text + r->text_len, piece, (size_t)n);
            r->text_len += (size_t)n;
        }
        if (r->n_out >= n_predict) break;
        if (decode(e, &tok, 1, n_past) != 0) die("decode failed");
        n_past++;
    }
    r->t_end = now_ns();
    usage_ok = usage_ok && thread_usage(&u1) == 0;
    r->cpu_ns = usage_ok ? u1.cpu_ns - u0.cpu_ns : -1;
    r->waits = usage_ok ? u1.waits - u0.waits : -1;
    r->preemptions = usage_ok ? u1.preemptions - u0.preemptions : -1;
}

static void free_run(run_t *r) {
    free(r->tokens);
    free(r->token_ns);
    free(r->text);
}

/* Time from "turn 2 arrives" to its first sampled token. */
static int64_t turn2_ttft(engine_t *e, const llama_token *toks, int n, int keep) {
    int64_t t0 = now_ns();
    llama_memory_t mem = llama_get_memory(e->ctx);
    if (keep > 0) {
        if (!llama_memory_seq_rm(mem, 0, keep, -1)) die("seq_rm failed");
    } else {
        llama_memory_clear(mem, true);
    }
    llama_sampler_reset(e->smpl);
    if (decode(e, toks + keep, n - keep, keep) != 0) die("turn-2 decode failed");
    volatile llama_token tok = llama_sampler_sample(e->smpl, e->ctx, -1);
    (void)tok;
    return now_ns() - t0;
}

/* ---- busy thread ----------------------------------------------------------- */

static volatile int busy_stop = 0;
static volatile uint64_t busy_count = 0;

static void *busy_main(void *arg) {
    (void)arg;
    while (!__atomic_load_n(&busy_stop, __ATOMIC_RELAXED)) busy_count++;
    return NULL;
}

static pthread_t busy_start(void) {
    pthread_t t;
    __atomic_store_n(&busy_stop, 0, __ATOMIC_RELAXED);
    if (pthread_create(&t, NULL, busy_main, NULL) != 0) die("pthread_create failed");
    return t;
}

static void busy_end(pthread_t t) {
    __atomic_store_n(&busy_stop, 1, __ATOMIC_RELAXED);
    pthread_join(t, NULL);
}

static long rss_kb(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident < 0 ? -1 : resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* ---- JSON output --------------------------------------------------------- */

static void json_str(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void print_run(const run_t *r) {
    printf("{\"t_start_ns\": %" PRId64 ", \"t_prefill_end_ns\": %" PRId64 ", \"t_first_ns\": %" PRId64
           ", \"t_end_ns\": %" PRId64 ", \"n_tokens\": %d, \"n_chunks\": 0, \"stop_reason\": \"%s\""
           ", \"t_loop_first_ns\": %" PRId64 ", \"t_loop_last_ns\": %" PRId64,
           r->t_start, r->t_prefill_end, r->n_out ? r->token_ns[0] : r->t_end, r->t_end, r->n_out,
           r->stop_reason, r->n_out ? r->token_ns[0] : 0, r->n_out ? r->token_ns[r->n_out - 1] : 0);
    if (r->cpu_ns >= 0)
        printf(", \"loop_wall_ns\": %" PRId64 ", \"loop_cpu_ns\": %" PRId64 ", \"loop_waits\": %" PRId64
               ", \"loop_preemptions\": %" PRId64, r->t_end - r->t_start, r->cpu_ns, r->waits, r->preemptions);
    printf(", \"tokens\": [");
    for (int i = 0; i < r->n_out; i++) printf(i ? ", %d" : "%d", r->tokens[i]);
    printf("], \"token_ns\": [");
    for (int i = 0; i < r->n_out; i++) printf(i ? ", %" PRId64 : "%" PRId64, r->token_ns[i]);
    printf("], \"text\": ");
    /* The text may end inside a UTF-8 character: Python decodes with "replace". */
    json_str(r->text, r->text_len);
    printf("}");
}

/* As xybrid.Context: the context runs on its own ggml thread pool (llama.cpp
 * is built without OpenMP), looked up through the CPU backend's registry. */
typedef struct ggml_threadpool *(*pool_new_fn)(struct ggml_threadpool_params *);
typedef void (*pool_free_fn)(struct ggml_threadpool *);

static pool_free_fn pool_free;

static struct ggml_threadpool *attach_pool(llama_context *ctx, int n_threads) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_reg_t reg = cpu ? ggml_backend_dev_backend_reg(cpu) : NULL;
    if (!reg) die("no CPU backend");
    pool_new_fn pool_new = (pool_new_fn)ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
    pool_free = (pool_free_fn)ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free");
    if (!pool_new || !pool_free) die("the CPU backend has no thread pool functions");
    struct ggml_threadpool_params params = ggml_threadpool_params_default(n_threads);
    params.poll = 1; /* xybrid's XY_THREADPOOL_POLL */
    struct ggml_threadpool *pool = pool_new(&params);
    if (!pool) die("cannot create the thread pool");
    llama_attach_threadpool(ctx, pool, pool);
    return pool;
}

int main(int argc, char **argv) {
    opts_t o;
    parse(argc, argv, &o);
    long rss_start_kb = rss_kb();
    int64_t t_load0 = now_ns();

    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    /* As xybrid.Model: default parameters, CPU only, mmap unless told otherwise. */
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.load_mode = o.no_mmap ? LLAMA_LOAD_MODE_NONE : LLAMA_LOAD_MODE_MMAP;
    llama_model *model = llama_model_load_from_file(o.model, mp);
    if (!model) die("cannot load the model");
    const llama_vocab *vocab = llama_model_get_vocab(model);

    /* As xybrid.Context: default parameters plus the benchmark's knobs. */
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)o.n_ctx;
    cp.n_batch = (uint32_t)o.n_batch;
    cp.n_ubatch = (uint32_t)(o.n_ubatch < o.n_batch ? o.n_ubatch : o.n_batch);
    cp.n_seq_max = 1;
    cp.n_threads = o.n_threads;
    cp.n_threads_batch = o.n_threads;
    cp.flash_attn_type = o.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = false;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create the context");
    struct ggml_threadpool *pool = attach_pool(ctx, o.n_threads);

    /* As xybrid.Sampler: greedy, or top-k -> top-p -> min-p -> temperature -> draw. */
    struct llama_sampler_chain_params sp = llama_sampler_chain_default_params();
    sp.no_perf = true;
    llama_sampler *smpl = llama_sampler_chain_init(sp);
    if (o.grammar_file) {
        /* The plain way: the grammar first in the chain, applied to every
         * candidate at every step (xybrid samples first and checks). */
        char *gbnf = read_file(o.grammar_file);
        llama_sampler *grammar = llama_sampler_init_grammar(vocab, gbnf, "root");
        free(gbnf);
        if (!grammar) die("the grammar does not parse");
        llama_sampler_chain_add(smpl, grammar);
    }
    if (o.temp <= 0.0f) {
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    } else {
        if (o.top_k > 0) llama_sampler_chain_add(smpl, llama_sampler_init_top_k(o.top_k));
        if (o.top_p < 1.0f) llama_sampler_chain_add(smpl, llama_sampler_init_top_p(o.top_p, 1));
        if (o.min_p > 0.0f) llama_sampler_chain_add(smpl, llama_sampler_init_min_p(o.min_p, 1));
        llama_sampler_chain_add(smpl, llama_sampler_init_temp(o.temp));
        llama_sampler_chain_add(smpl, llama_sampler_init_dist(o.seed));
    }

    engine_t e = {ctx, vocab, smpl, llama_batch_init(llama_n_batch(ctx), 0, 1), (int)llama_n_batch(ctx)};
    int64_t t_load1 = now_ns();

    int n_prompt = 0;
    llama_token *prompt;
    if (o.tokens_file) {
        prompt = read_tokens(o.tokens_file, &n_prompt);
    } else {
        int len = (int)strlen(o.prompt);
        prompt = malloc((len + 16) * sizeof(llama_token));
        n_prompt = llama_tokenize(vocab, o.prompt, len, prompt, len + 16, true, false);
        if (n_prompt < 0) die("tokenize failed");
    }
    if (n_prompt < 1) die("empty prompt");
    int n_vocab = llama_vocab_n_tokens(vocab);
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= n_vocab) die("prompt token outside the vocabulary");
    if (n_prompt + o.n_predict > o.n_ctx) die("prompt + n_predict do not fit in the context");

    if (o.warmup > 0) {
        run_t w;
        run_generate(&e, prompt, n_prompt < 64 ? n_prompt : 64, o.warmup, o.ignore_eos, &w);
        free_run(&w);
    }

    if (o.serve) {
        printf("{\"ready\": true, \"contestant\": \"native\", \"n_prompt\": %d, \"t_load_ns\": %" PRId64
               ", \"rss_start_kb\": %ld, \"rss_before_load_kb\": %ld}\n",
               n_prompt, t_load1 - t_load0, rss_start_kb, rss_start_kb);
        fflush(stdout);
        char line[256];
        int k = o.prefix_len;
        while (fgets(line, sizeof(line), stdin)) {
            if (strncmp(line, "generate", 8) == 0) {
                int with_busy = strstr(line, "busy") != NULL;
                pthread_t bt;
                memset(&bt, 0, sizeof(bt));
                if (with_busy) bt = busy_start();
                run_t run;
                run_generate(&e, prompt, n_prompt, o.n_predict, o.ignore_eos, &run);
                if (with_busy) busy_end(bt);
                print_run(&run);
                printf("\n");
                free_run(&run);
            } else if (strncmp(line, "turn1", 5) == 0) {
                if (k < 1 || k >= n_prompt) die("--prefix-len must be in 1..n_prompt-1");
                llama_memory_clear(llama_get_memory(ctx), true);
                if (decode(&e, prompt, k, 0) != 0) die("turn-1 decode failed");
                printf("{}\n");
            } else if (strncmp(line, "turn2", 5) == 0) {
                if (k < 1 || k >= n_prompt) die("--prefix-len must be in 1..n_prompt-1");
                int reuse = strstr(line, "reuse") != NULL;
                printf("{\"ttft_ns\": %" PRId64 "}\n", turn2_ttft(&e, prompt, n_prompt, reuse ? k : 0));
            } else if (strncmp(line, "exit", 4) == 0) {
                struct rusage ru;
                getrusage(RUSAGE_SELF, &ru);
                printf("{\"maxrss_kb\": %ld}\n", ru.ru_maxrss);
                fflush(stdout);
                break;
            } else {
                printf("{\"error\": \"unknown command\"}\n");
            }
            fflush(stdout);
        }
        llama_batch_free(e.batch);
        llama_sampler_free(smpl);
        llama_free(ctx);
        pool_free(pool);
        llama_model_free(model);
        free(prompt);
        return 0;
    }

    pthread_t busy;
    memset(&busy, 0, sizeof(busy));
    if (o.busy_thread) busy = busy_start();

    printf("{\"contestant\": \"native\", \"mode\": \"%s\", \"n_prompt\": %d, \"n_threads\": %d, "
           "\"n_ctx\": %u, \"n_batch\": %u, \"flash_attn\": %s, \"t_load_ns\": %" PRId64 ", ",
           o.mode, n_prompt, o.n_threads, llama_n_ctx(ctx), llama_n_batch(ctx),
           o.flash_attn ? "true" : "false", t_load1 - t_load0);
    if (strcmp(o.mode, "multiturn") == 0) {
        int k = o.prefix_len;
        if (k < 1 || k >= n_prompt) die("--prefix-len must be in 1..n_prompt-1");
        /* Turn 1: the shared prefix is in the cache, as after a previous reply. */
        llama_memory_clear(llama_get_memory(ctx), true);
        if (decode(&e, prompt, k, 0) != 0) die("turn-1 decode failed");
        printf("\"prefix_len\": %d, \"ttft_reuse_ns\": [", k);
        for (int r = 0; r < o.reps; r++) printf(r ? ", %" PRId64 : "%" PRId64, turn2_ttft(&e, prompt, n_prompt, k));
        printf("], \"ttft_cleared_ns\": [");
        for (int r = 0; r < o.reps_cleared; r++) printf(r ? ", %" PRId64 : "%" PRId64, turn2_ttft(&e, prompt, n_prompt, 0));
        printf("], ");
    } else if (strcmp(o.mode, "generate") == 0) {
        printf("\"runs\": [");
        for (int r = 0; r < o.reps; r++) {
            run_t run;
            run_generate(&e, prompt, n_prompt, o.n_predict, o.ignore_eos, &run);
            if (r) printf(", ");
            print_run(&run);
            free_run(&run);
        }
        printf("], ");
    } else {
        usage();
    }
    if (o.busy_thread) busy_end(busy);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("\"busy_thread\": %s, \"rss_start_kb\": %ld, \"maxrss_kb\": %ld}\n", o.busy_thread ? "true" : "false",
           rss_start_kb, ru.ru_maxrss);

    llama_batch_free(e.batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    pool_free(pool);
    llama_model_free(model);
    free(prompt);
    return 0;
}
