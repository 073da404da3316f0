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
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
cimport cython

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
    OverloadedError,
    UnsupportedInputError,
    XybridError,
)


# Unread streamed bytes the loop may run ahead of its consumer before it
# waits. Defined before the includes: default arguments of the def functions
# in _context.pxi are evaluated when the module initialises, in file order.
cdef size_t DEFAULT_BUFFER_LIMIT = 1 << 16
# How often, at most, a stream wakes its consumer (see _generation.pxi).
cdef int DEFAULT_CHUNK_INTERVAL_US = 1000
# Batched streams share a budget of consumer wake-ups: with N streams running,
# each is woken at most once per N / STREAM_WAKES_PER_SECOND seconds (never
# less than its chunk interval). A wake costs the consumer ~20 us of Python;
# on a fast model 16 streams woken every step would take a core's fifth from
# the decode threads. 2,000 a second is 8 ms between pieces at 16 streams,
# still under a screen frame; the first text and the end are never held.
cdef int64_t STREAM_WAKES_PER_SECOND = 2000

include "_backend.pxi"
include "_rpc.pxi"
include "_model.pxi"
include "_sampler.pxi"
include "_context.pxi"
include "_logprobs.pxi"
include "_generation.pxi"
include "_multimodal.pxi"
include "_scheduler.pxi"
