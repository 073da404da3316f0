# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=True, freethreading_compatible=False
"""The native engine of xybrid: llama.cpp model, context, sampler and the
GIL-free generation loop.

Ownership is simple and one-way: a :class:`Context` holds a reference to its
:class:`Model`, a :class:`Generation` holds references to its Context and
Sampler, so nothing is freed while something below it still runs. Each C
handle is freed exactly once, in ``close()`` or ``__dealloc__``.

The generation loop (``gen_run``) touches no Python object. Non-streaming
calls run it on the calling thread with the GIL released. Streaming calls run
it on a native worker thread; the loop appends emitted text to a buffer owned
by C and the Python consumer (iterator or callback trampoline) takes
everything that accumulated since its last turn, so the loop never waits for
the GIL. The buffer is bounded: a consumer that stops reading holds the loop
back instead of letting memory grow.
"""

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize

from xybrid._native.llama cimport *
from xybrid._native.mtmd cimport *

import os
import threading

from xybrid.errors import (
    ContextOverflowError,
    GenerationError,
    GrammarError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    XybridError,
)


cdef extern from "engine_support.h" nogil:
    int64_t xy_now_ns()
    ctypedef struct xy_thread_usage_t:
        int64_t cpu_ns
        int64_t waits
        int64_t preemptions
    int xy_thread_usage(xy_thread_usage_t * u)
    int xy_atomic_load(const int * p)
    void xy_atomic_store(int * p, int v)
    int64_t xy_find(const char * hay, size_t hay_len, const char * needle, size_t needle_len)
    size_t xy_utf8_complete_len(const char * buf, size_t length)
    void xy_log_callback(ggml_log_level level, const char * text, void * user_data)
    void xy_log_set_print_level(int level)
    size_t xy_log_take(char * out, size_t cap)
    llama_token xy_sample(llama_sampler * chain, llama_sampler * grammar, llama_context * ctx,
                          int32_t idx, llama_token_data * cur, int32_t n_vocab)
    ggml_threadpool * xy_threadpool_new(int n_threads)
    void xy_threadpool_free(ggml_threadpool * pool)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t * thread, const void * attr, void * (*start)(void *) noexcept nogil, void * arg)
    int pthread_join(pthread_t thread, void ** retval)
    int pthread_mutex_init(pthread_mutex_t * mutex, const void * attr)
    int pthread_mutex_destroy(pthread_mutex_t * mutex)
    int pthread_mutex_lock(pthread_mutex_t * mutex)
    int pthread_mutex_unlock(pthread_mutex_t * mutex)
    int pthread_cond_init(pthread_cond_t * cond, const void * attr)
    int pthread_cond_destroy(pthread_cond_t * cond)
    int pthread_cond_wait(pthread_cond_t * cond, pthread_mutex_t * mutex)
    int pthread_cond_broadcast(pthread_cond_t * cond)


# Unread streamed bytes the loop may run ahead of its consumer before it
# waits. Defined before the includes: default arguments of the def functions
# in _context.pxi are evaluated when the module initialises, in file order.
cdef size_t DEFAULT_BUFFER_LIMIT = 1 << 16
# How often, at most, a stream wakes its consumer (see _generation.pxi).
cdef int DEFAULT_CHUNK_INTERVAL_US = 1000

# Forward declarations: the classes refer to each other.
cdef class Model
cdef class Context
cdef class Sampler
cdef class Generation
cdef class Multimodal
cdef class Chunks
cdef struct GenState  # defined in _generation.pxi, used by _logprobs.pxi


include "_backend.pxi"
include "_model.pxi"
include "_sampler.pxi"
include "_context.pxi"
include "_logprobs.pxi"
include "_generation.pxi"
include "_multimodal.pxi"
