/* Small C helpers for the Cython engine (_engine.pyx).
 *
 * Things that are awkward to say in Cython: a monotonic clock in
 * nanoseconds (the same clock as Python's time.monotonic_ns on Linux),
 * atomic flags shared between the decode thread and other threads, and the
 * llama.cpp log sink that keeps the last warnings/errors so that a failed
 * load can tell the user *why* instead of printing to stderr.
 */
#ifndef XYBRID_ENGINE_SUPPORT_H
#define XYBRID_ENGINE_SUPPORT_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <math.h>
#include <stdlib.h>

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

static inline int64_t xy_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;
}

/* What the OS has given the calling thread: CPU time, and how often it was
 * switched out because it waited (voluntary: a lock, a condition variable)
 * or because another thread took its CPU (involuntary). A loop that slows
 * down beside a busy thread while its waits stay at zero is losing the CPU,
 * not waiting for us. Returns 0, or -1 where the platform cannot say. */
#include <sys/resource.h>
typedef struct {
    int64_t cpu_ns;
    int64_t waits;
    int64_t preemptions;
} xy_thread_usage_t;

static inline int xy_thread_usage(xy_thread_usage_t *u) {
#if defined(RUSAGE_THREAD) && defined(CLOCK_THREAD_CPUTIME_ID)
    struct timespec ts;
    struct rusage ru;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0 || getrusage(RUSAGE_THREAD, &ru) != 0)
        return -1;
    u->cpu_ns = (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;
    u->waits = (int64_t)ru.ru_nvcsw;
    u->preemptions = (int64_t)ru.ru_nivcsw;
    return 0;
#else
    (void)u;
    return -1;
#endif
}

static inline int xy_atomic_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void xy_atomic_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Wake pipes: a scheduled sequence pokes the write end when its consumer
 * should look, and an asyncio consumer watches the read end with
 * loop.add_reader, so no thread waits per stream. Both ends are
 * non-blocking: a full pipe already means "look", so a failed poke is fine. */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

static inline int xy_pipe_nonblock(int fds[2]) {
    if (pipe(fds) != 0) return -1;
    for (int i = 0; i < 2; i++) {
        if (fcntl(fds[i], F_SETFL, O_NONBLOCK) != 0 || fcntl(fds[i], F_SETFD, FD_CLOEXEC) != 0) {
            close(fds[0]);
            close(fds[1]);
            return -1;
        }
    }
    return 0;
}

static inline void xy_poke_fd(int fd) {
    char one = 1;
    ssize_t rc;
    do {
        rc = write(fd, &one, 1);
    } while (rc < 0 && errno == EINTR);
}

/* Empty the read end of a wake pipe. */
static inline void xy_drain_fd(int fd) {
    char buf[64];
    while (read(fd, buf, sizeof(buf)) > 0) {
    }
}

static inline void xy_close_fd(int fd) {
    if (fd >= 0) close(fd);
}

/* Wait on a condition for at most ms milliseconds (CLOCK_REALTIME, the
 * condition's default clock). Returns 0 when signalled, else ETIMEDOUT. */
static inline int xy_cond_wait_ms(pthread_cond_t *cond, pthread_mutex_t *mu, int ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (long)ms * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    return pthread_cond_timedwait(cond, mu, &ts);
}

/* Earliest occurrence of needle in hay, or -1. Stop strings are short, so a
 * memchr on the first byte followed by memcmp is all we need. */
static inline int64_t xy_find(const char *hay, size_t hay_len, const char *needle, size_t needle_len) {
    if (needle_len == 0 || needle_len > hay_len) return -1;
    const char *p = hay;
    const char *last = hay + (hay_len - needle_len);
    while (p <= last) {
        const char *hit = (const char *)memchr(p, (unsigned char)needle[0], (size_t)(last - p) + 1);
        if (!hit) return -1;
        if (memcmp(hit, needle, needle_len) == 0) return (int64_t)(hit - hay);
        p = hit + 1;
    }
    return -1;
}

/* Length of the longest prefix of buf[0:len] that does not end inside an
 * incomplete UTF-8 sequence. Invalid bytes are let through (the Python side
 * decodes with errors="replace"); only a lead byte still waiting for its
 * continuation bytes is held back. */
static inline size_t xy_utf8_complete_len(const char *buf, size_t len) {
    size_t back = 0;
    while (back < 4 && back < len) {
        unsigned char c = (unsigned char)buf[len - 1 - back];
        if ((c & 0xC0) != 0x80) {           /* lead byte or ASCII */
            size_t need;
            if (c < 0x80) need = 1;
            else if ((c & 0xE0) == 0xC0) need = 2;
            else if ((c & 0xF0) == 0xE0) need = 3;
            else if ((c & 0xF8) == 0xF0) need = 4;
            else return len;                 /* invalid lead: nothing to wait for */
            return (back + 1 < need) ? len - 1 - back : len;
        }
        back++;
    }
    return len;
}

/* Sampling (xy_sample) lives in xy_shim.cpp, behind the C++ exception boundary. */

/* ---- llama.cpp log sink ------------------------------------------------ */

#define XY_LOG_KEEP 4096
static pthread_mutex_t xy_log_mutex = PTHREAD_MUTEX_INITIALIZER;
static char xy_log_tail[XY_LOG_KEEP];   /* last warnings and errors, newest last */
static size_t xy_log_tail_len = 0;
static int xy_log_print_level = GGML_LOG_LEVEL_NONE + 100; /* print nothing by default */
static int xy_log_prev_level = GGML_LOG_LEVEL_INFO;

static void xy_log_callback(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    int lvl = (int)level;
    pthread_mutex_lock(&xy_log_mutex);
    if (lvl == GGML_LOG_LEVEL_CONT) lvl = xy_log_prev_level; else xy_log_prev_level = lvl;
    if (lvl >= GGML_LOG_LEVEL_WARN && text) {
        size_t n = strlen(text);
        if (n >= XY_LOG_KEEP) { text += n - (XY_LOG_KEEP - 1); n = XY_LOG_KEEP - 1; }
        if (xy_log_tail_len + n >= XY_LOG_KEEP) {
            size_t drop = xy_log_tail_len + n - (XY_LOG_KEEP - 1);
            memmove(xy_log_tail, xy_log_tail + drop, xy_log_tail_len - drop);
            xy_log_tail_len -= drop;
        }
        memcpy(xy_log_tail + xy_log_tail_len, text, n);
        xy_log_tail_len += n;
        xy_log_tail[xy_log_tail_len] = '\0';
    }
    int print = lvl >= xy_log_print_level;
    pthread_mutex_unlock(&xy_log_mutex);
    if (print && text) fputs(text, stderr);
}

static void xy_log_set_print_level(int level) {
    pthread_mutex_lock(&xy_log_mutex);
    xy_log_print_level = level;
    pthread_mutex_unlock(&xy_log_mutex);
}

/* Copy the kept log text into out (NUL-terminated) and clear it. */
static size_t xy_log_take(char *out, size_t cap) {
    pthread_mutex_lock(&xy_log_mutex);
    size_t n = xy_log_tail_len < cap - 1 ? xy_log_tail_len : cap - 1;
    memcpy(out, xy_log_tail + (xy_log_tail_len - n), n);
    out[n] = '\0';
    xy_log_tail_len = 0;
    xy_log_tail[0] = '\0';
    pthread_mutex_unlock(&xy_log_mutex);
    return n;
}

/* A CPU thread pool per context.
 *
 * llama.cpp is built without OpenMP (scripts/build_llama_cpp.py), so the
 * CPU backend runs graphs on a ggml thread pool. Without one attached, ggml
 * creates and joins worker threads for every graph, i.e. for every token.
 * With one attached the workers persist and whichever thread calls
 * llama_decode (the caller's, or a streaming generation's own) joins them as
 * worker 0, so the decode speed does not depend on the calling thread. (With
 * OpenMP, libgomp keeps a team per calling thread and drops to a very short
 * spin-wait once the teams outnumber the cores: a stream on its own thread ran
 * at about half the speed of a plain call.)
 *
 * The functions are looked up through the CPU backend's registry, as
 * llama.cpp's own tools do, so this also works when backends are loaded
 * dynamically. NULL means "no pool": llama.cpp then falls back to its default. */
#define XY_THREADPOOL_POLL 1

typedef struct ggml_threadpool *(*xy_threadpool_new_fn)(struct ggml_threadpool_params *);
typedef void (*xy_threadpool_free_fn)(struct ggml_threadpool *);

static int xy_threadpool_lookup(xy_threadpool_new_fn *new_fn, xy_threadpool_free_fn *free_fn) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_reg_t reg = cpu ? ggml_backend_dev_backend_reg(cpu) : NULL;
    if (!reg) return 0;
    *new_fn = (xy_threadpool_new_fn)ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
    *free_fn = (xy_threadpool_free_fn)ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free");
    return *new_fn != NULL && *free_fn != NULL;
}

static struct ggml_threadpool *xy_threadpool_new(int n_threads) {
    xy_threadpool_new_fn new_fn;
    xy_threadpool_free_fn free_fn;
    if (n_threads < 1 || n_threads > GGML_MAX_N_THREADS || !xy_threadpool_lookup(&new_fn, &free_fn)) return NULL;
    struct ggml_threadpool_params params = ggml_threadpool_params_default(n_threads);
    /* Idle workers spin before they sleep. ggml's default (50) spins for about
     * 0.2 s after every graph, which takes a core from whatever runs next;
     * 1 spins for a few ms, like libgomp, and covers the sampling gap between
     * two tokens just as well (same tokens/s on the tiny benchmark model). */
    params.poll = XY_THREADPOOL_POLL;
    return new_fn(&params);
}

static void xy_threadpool_free(struct ggml_threadpool *pool) {
    xy_threadpool_new_fn new_fn;
    xy_threadpool_free_fn free_fn;
    if (pool && xy_threadpool_lookup(&new_fn, &free_fn)) free_fn(pool);
}

/* Ctrl-C during a generation that runs on the main thread with the GIL
 * released (Context.generate without a callback). Python only looks at its
 * signal flag when it runs bytecode, so without this the interrupt would
 * wait for the whole generation. While armed, SIGINT sets the generation's
 * cancel flag (the loop stops within one decode step) and is passed on to
 * the handler that was installed, Python's, which trips its own flag so
 * that KeyboardInterrupt is raised once the call returns.
 * Main thread only, one generation at a time (the main thread runs one):
 * the state below is written there and read by the handler. */
#include <signal.h>
static struct sigaction xy_sigint_prev;
static int *volatile xy_sigint_cancel = NULL;

static void xy_sigint_handler(int sig, siginfo_t *info, void *uctx) {
    int *cancel = xy_sigint_cancel;
    if (cancel != NULL) __atomic_store_n(cancel, 1, __ATOMIC_RELEASE);
    if (xy_sigint_prev.sa_flags & SA_SIGINFO) {
        if (xy_sigint_prev.sa_sigaction != NULL) xy_sigint_prev.sa_sigaction(sig, info, uctx);
    } else if (xy_sigint_prev.sa_handler != SIG_DFL && xy_sigint_prev.sa_handler != SIG_IGN) {
        xy_sigint_prev.sa_handler(sig);
    }
}

/* 1 when armed; 0 (nothing changed) when SIGINT is ignored or left to the
 * default action, which this must not override, or sigaction failed. */
static int xy_sigint_arm(int *cancel) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    if (sigaction(SIGINT, NULL, &xy_sigint_prev) != 0) return 0;
    if (!(xy_sigint_prev.sa_flags & SA_SIGINFO) &&
        (xy_sigint_prev.sa_handler == SIG_DFL || xy_sigint_prev.sa_handler == SIG_IGN)) return 0;
    sa.sa_sigaction = xy_sigint_handler;
    sa.sa_flags = SA_SIGINFO | (xy_sigint_prev.sa_flags & SA_ONSTACK);
    sigemptyset(&sa.sa_mask);
    xy_sigint_cancel = cancel;
    if (sigaction(SIGINT, &sa, NULL) != 0) {
        xy_sigint_cancel = NULL;
        return 0;
    }
    return 1;
}

static void xy_sigint_disarm(void) {
    sigaction(SIGINT, &xy_sigint_prev, NULL);
    xy_sigint_cancel = NULL;
}

#endif
