# Layout of the engine: every C struct and the attributes of every class of
# _engine.pyx, with who may touch what. The code lives in the .pxi parts.
#
# Threads. Python code runs on the caller's threads with the GIL. C state is
# touched without the GIL by exactly one loop at a time:
# - the single-sequence loop (gen_run) of a Generation, on the calling thread
#   (Context.generate) or its own native thread (Context.stream);
# - the scheduler thread of a Scheduler, for every sequence submitted to it.
# A Context is used by one of them at a time: `busy` is set from the start of
# a generation (or of a Scheduler) to its end, and every method that touches
# the llama_context checks it.
#
# Lock order: SchedState.mu before a sequence's GenState.mu, never the
# reverse; nobody waits for the GIL while holding either (a consumer unlocks
# GenState.mu before it takes the GIL back or kicks the scheduler).

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from xybrid._native.llama cimport *
from xybrid._native.mtmd cimport *


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
    int pthread_cond_signal(pthread_cond_t * cond)


cdef extern from "engine_support.h" nogil:
    int64_t xy_now_ns()
    ctypedef struct xy_thread_usage_t:
        int64_t cpu_ns
        int64_t waits
        int64_t preemptions
    int xy_thread_usage(xy_thread_usage_t * u)
    int xy_atomic_load(const int * p)
    void xy_atomic_store(int * p, int v)
    int xy_pipe_nonblock(int * fds)
    void xy_poke_fd(int fd)
    void xy_drain_fd(int fd)
    void xy_close_fd(int fd)
    int64_t xy_find(const char * hay, size_t hay_len, const char * needle, size_t needle_len)
    size_t xy_utf8_complete_len(const char * buf, size_t length)
    void xy_log_callback(ggml_log_level level, const char * text, void * user_data)
    void xy_log_set_print_level(int level)
    size_t xy_log_take(char * out, size_t cap)
    ggml_threadpool * xy_threadpool_new(int n_threads)
    void xy_threadpool_free(ggml_threadpool * pool)

# Every llama.cpp call that can throw a C++ exception goes through these
# (xy_shim.cpp): they catch it and return an error code instead.
cdef extern from "xy_shim.h" nogil:
    enum:
        XY_SAMPLE_NO_LOGITS
        XY_SAMPLE_GRAMMAR_BLOCKED
        XY_SAMPLE_EXCEPTION
        XY_SAMPLE_GRAMMAR_TOO_COMPLEX
        XY_CALL_FAILED
    llama_token xy_sample(llama_sampler * chain, llama_sampler * grammar, llama_context * ctx,
                          int32_t idx, llama_token_data * cur, int32_t n_vocab, int argmax)
    llama_sampler * xy_grammar_init(const llama_vocab * vocab, const char * grammar, const char * root,
                                    int64_t max_stacks, int64_t * n_stacks)
    int xy_grammar_stats(llama_sampler * grammar, int64_t * n_stacks)
    int xy_sampler_accept(llama_sampler * smpl, llama_token token)
    int xy_sampler_reset(llama_sampler * smpl)
    int xy_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur)
    int32_t xy_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                        llama_token * tokens, int32_t n_tokens_max, int add_special, int parse_special)
    int32_t xy_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                              int32_t length, int32_t lstrip, int special)
    int32_t xy_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                          char * text, int32_t text_len_max, int remove_special, int unparse_special)
    int32_t xy_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg,
                                   int add_ass, char * buf, int32_t length)

cdef extern from "engine_support.h" nogil:
    int xy_cond_wait_ms(pthread_cond_t * cond, pthread_mutex_t * mu, int ms)
    int xy_sigint_arm(int * cancel)
    void xy_sigint_disarm()

# ggml's RPC backend (see rpc_support.h and _rpc.pxi). Every llama_decode of
# the engine is xy_decode, which turns a decode that ran while a remote
# server of its model was lost into XY_RC_RPC_LOST.
cdef extern from "rpc_support.h" nogil:
    ctypedef ggml_backend_reg_t (*xy_rpc_add_server_fn)(const char * endpoint)
    ctypedef void (*xy_rpc_start_server_fn)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                            size_t n_devices, ggml_backend_dev_t * devices)
    ctypedef size_t (*xy_rpc_last_failure_fn)(char * buf, size_t size)
    ctypedef struct xy_rpc_api_t:
        int bound
        xy_rpc_add_server_fn add_server
        xy_rpc_start_server_fn start_server
        void * failure_count
        xy_rpc_last_failure_fn last_failure
    xy_rpc_api_t xy_rpc_api
    int xy_rpc_bind()
    uint64_t XY_RPC_UNUSED
    int32_t XY_RC_RPC_LOST
    uint64_t xy_rpc_failures()
    int xy_rpc_lost(uint64_t base)
    int32_t xy_decode(llama_context * ctx, llama_batch batch, uint64_t rpc_base)
    ggml_backend_dev_t xy_capped_device(ggml_backend_dev_t inner, size_t cap)



# --- per sequence -------------------------------------------------------------------
# The state of one generation. Inputs are written before the loop starts and
# only read while it runs. Progress fields belong to the loop that runs the
# sequence. The text buffer (text, text_len, emitted, consumed, done) is shared
# with the consumer under `mu` when streaming or scheduled. `cancel` is atomic.
cdef struct GenState:
    # inputs (read-only while the loop runs)
    llama_context * ctx
    const llama_vocab * vocab
    llama_sampler * smpl
    llama_sampler * grammar     # NULL without a grammar
    llama_token_data * candidates
    int32_t n_vocab
    bint argmax                 # the chain is greedy only: a plain argmax of the row
    llama_batch * batch
    int32_t n_batch
    int32_t n_ctx
    uint64_t rpc_base           # the model's RPC failure baseline (XY_RPC_UNUSED: none)
    llama_seq_id seq_id
    const llama_token * prompt
    int32_t n_prompt
    int32_t max_tokens
    const char ** stops
    size_t * stop_lens
    int32_t n_stops
    bint streaming
    bint render_special         # write control tokens' text (tool-call markers)
    size_t buffer_limit
    int64_t chunk_interval_ns   # 0: wake the consumer for every token
    int64_t last_wake_ns        # when the consumer was last woken (0: never)
    # scheduled sequences only (sched != NULL; see _scheduler.pxi)
    void * sched                # the SchedState driving this sequence
    int phase                   # PHASE_*; written by the scheduler thread
    int released                # under sched.mu: the scheduler is done with this state
    int wake_fd                 # write end of a pipe poked when the consumer should look; -1: none
    bint poke_pending           # scheduler thread only: the pipe is owed a poke, given after the step
    int32_t prompt_off          # prompt tokens reused from the cache (not decoded)
    int32_t prefilled           # prompt tokens decoded so far (from prompt_off)
    int32_t batch_idx           # row of this sequence's logits in the current batch; -1: none
    llama_token next_token      # sampled, not yet decoded
    int64_t t_submit_ns         # when the request was queued
    void * mm_ctx               # mtmd_context * for a media prompt, else NULL
    void * mm_chunks            # mtmd_input_chunks * (owned by the Python Chunks object)
    int32_t mm_n_pos            # positions the media prompt takes
    # progress
    llama_pos n_past            # next position to write in the sequence
    llama_token * out_tokens    # [max_tokens] sampled tokens (EOG excluded)
    int64_t * token_ns          # [max_tokens] time each token was sampled
    int32_t n_out
    int32_t n_out_decoded       # sampled tokens that went through llama_decode
    char * text                 # every byte produced (stop string cut off)
    size_t text_len
    size_t text_cap
    size_t emitted              # bytes final and visible to the consumer
    size_t consumed             # bytes the consumer has taken
    int reason
    int error_kind
    int32_t error_code
    int64_t t_start_ns
    int64_t t_prefill_end_ns
    int64_t t_end_ns
    bint usage_ok               # the platform reports per-thread usage
    xy_thread_usage_t usage_start   # the loop thread's, at the start and the end
    xy_thread_usage_t usage_end
    # cross-thread
    int cancel                  # atomic: set by any thread, read every step
    int done                    # set under mu when the loop has finished
    pthread_mutex_t mu
    pthread_cond_t cond_data    # producer -> consumer: new bytes or done
    pthread_cond_t cond_space   # consumer -> producer: bytes taken or cancel
    # logprobs (see _logprobs.pxi); n_logprobs -1: not collected
    int32_t n_logprobs
    float * logprob             # [max_tokens]
    int32_t * top_ids           # [max_tokens * n_logprobs]
    float * top_lp              # [max_tokens * n_logprobs]


# --- per batched context (see _scheduler.pxi) ---------------------------------------
# Slot.cells and a running sequence's loop fields belong to the scheduler
# thread. The queue, n_running, stopping, clear_idle, GenState.released and
# the statistics are under SchedState.mu.
cdef struct Slot:
    GenState * g            # the running sequence, NULL when free
    llama_token * cells     # tokens whose KV the sequence holds, by position
    int32_t n_cells         # how many of them are known token ids
    int32_t n_pos           # positions the sequence holds (> n_cells after media)
    int64_t last_used       # step when it last finished, for LRU among equals


cdef struct SchedState:
    llama_context * ctx
    uint64_t rpc_base       # the model's RPC failure baseline (XY_RPC_UNUSED: none)
    llama_batch * batch
    int32_t n_batch         # the token budget of one step and the batch capacity
    int32_t n_ctx
    int32_t n_slots
    Slot * slots
    bint recurrent          # no partial cuts or copies: every request starts empty
    # Sliding window of the model when its SWA layers keep only the window
    # (Context(swa_full=False)); 0 when every position is kept. A kept or
    # shared prefix is only usable where the window before its end is held.
    int32_t n_swa
    # the admission queue: a ring of waiting sequences, in arrival order
    GenState ** pending
    int32_t pending_cap
    int32_t pending_head
    int32_t n_pending
    int32_t max_queued
    int32_t n_running
    int stopping
    int clear_idle          # asked: drop the caches of the idle slots
    pthread_mutex_t mu
    pthread_cond_t cond_work        # to the scheduler: work, a kick, stop
    pthread_cond_t cond_released    # to consumers: a sequence was let go
    pthread_cond_t cond_room        # to blocked submitters: the queue has room
    # statistics, updated under mu once per step
    int64_t n_steps
    int64_t n_step_seqs     # sum over steps of the sequences in the batch
    int64_t n_step_tokens   # sum over steps of the tokens in the batch
    int64_t n_admitted
    int64_t n_finished
    int64_t n_reused        # prompt tokens kept from a slot's own cache
    int64_t n_copied        # prompt tokens shared from another slot
    int64_t n_evicted       # idle caches dropped to make room
    int64_t n_kv_full       # sequences ended because the KV cache was full
    int64_t busy_ns         # time spent in steps
    int32_t kv_pos_used     # positions held by all slots
    int64_t wake_interval_ns  # scheduler thread only: least time between two wakes of one
                              # streaming consumer this step (see STREAM_WAKES_PER_SECOND)


# --- classes --------------------------------------------------------------------------
# Ownership is one-way: a Context holds its Model, a Sampler its Model, a
# Generation its Context, Sampler and (scheduled) Scheduler, a Scheduler its
# Context; each C handle is freed once, in close() or __dealloc__.
#
# Everything that points into a Model (Context, Sampler, Multimodal, and
# Generation and Scheduler below) is @cython.no_gc_clear: when a reference
# cycle (a traceback holding the frame of a failed load, say) leaves a
# context and its model to the cyclic GC, the GC must not drop the
# context's reference to the model first, or the model is freed while the
# context still uses it. Kept, the reference makes the model outlive the
# context: the context's __dealloc__ frees it, then releases the model.

cdef class Model:
    cdef llama_model * ptr
    cdef const llama_vocab * vocab
    cdef int n_contexts
    # The RPC failure count when the model loaded (XY_RPC_UNUSED without RPC
    # servers); any other count means a server it uses was lost since.
    cdef readonly uint64_t rpc_base
    cdef readonly tuple rpc_devices     # dicts: name, endpoint, memory at load
    cdef readonly str path
    cdef readonly bint vocab_only
    cdef int check_open(self) except -1
    cdef int check_token(self, int token) except -1


cdef class Context:
    cdef llama_context * ptr
    # Owned: the CPU worker threads of this context (see xy_threadpool_new).
    # Freed after the context that uses it.
    cdef ggml_threadpool * threadpool
    cdef readonly Model model
    cdef llama_batch batch
    cdef bint has_batch
    cdef bint busy              # a generation or a scheduler owns the llama_context
    cdef readonly int n_batch_alloc
    cdef readonly bint embeddings
    cdef readonly bint swa_full       # sliding-window layers keep every position
    # The running generation, for cancel(), as a weak reference: a strong one
    # would make Context <-> Generation a cycle, so an abandoned stream
    # iterator would never be deallocated (and cancelled) while the context
    # lives, leaving the worker running and the context busy for good.
    cdef object current
    cdef void _free(self)
    cdef int check_open(self) except -1
    cdef int check_idle(self) except -1
    cdef int check_seq(self, int seq_id, bint allow_all=*) except -1
    cdef float * _logits_row(self, int index, Py_ssize_t length) except NULL


cdef class Sampler:
    cdef llama_sampler * ptr
    cdef llama_sampler * grammar        # owned separately from the chain
    cdef llama_token_data * candidates  # n_vocab scratch entries for the grammar path
    cdef int32_t n_vocab
    cdef readonly bint argmax_only      # greedy with nothing before it: sampled by a plain argmax
    cdef Model model
    cdef readonly dict params
    cdef add(self, llama_sampler * stage)
    cdef llama_token draw(self, llama_context * ctx, int32_t index) noexcept nogil


cdef class GenerationResult:
    cdef readonly list tokens
    cdef readonly str text
    cdef readonly str stop_reason
    cdef readonly int n_prompt
    cdef readonly int n_past
    cdef readonly int n_decoded
    cdef readonly object t_start_ns
    cdef readonly object t_prefill_end_ns
    cdef readonly object t_end_ns
    cdef readonly list token_ns
    cdef readonly list chunk_ns
    cdef readonly dict perf
    cdef readonly object loop_cpu_ns
    cdef readonly object loop_waits
    cdef readonly object loop_preemptions
    cdef readonly object t_submit_ns
    cdef readonly int n_cached
    cdef readonly int slot
    # With logprobs=n: log p of each token, and its n most likely alternatives
    # as (token id, log p) pairs; None otherwise.
    cdef readonly object logprobs
    cdef readonly object top_logprobs


# Never cleared by the cyclic GC before deallocation (@cython.no_gc_clear on
# its definition): a scheduler may read `g` until it sets `released`, and
# __dealloc__ waits for that.
cdef class Generation:
    cdef GenState g
    cdef Context context
    cdef Sampler sampler
    cdef list stop_bytes
    cdef bint sync_ready
    cdef bint thread_started
    cdef bint finished
    cdef pthread_t thread
    cdef char * scratch
    cdef size_t scratch_cap
    cdef list chunk_ns
    cdef readonly GenerationResult result
    cdef readonly object error
    cdef readonly int tokens_at_last_chunk
    # Scheduled sequences: the scheduler that drives this state, the Python
    # objects whose C handles it reads (media chunks, projector), and the
    # read end of the wake pipe (-1: none).
    cdef Scheduler scheduler
    cdef bint submitted
    cdef object keep_alive
    cdef int read_fd
    cdef object __weakref__  # Context.current refers to the running generation weakly
    cdef int setup(self, Context context, list tokens, int n_past, int seq_id, int max_tokens,
                   Sampler sampler, stop, bint streaming, size_t buffer_limit,
                   bint logits_ready=*, bint render_special=*, int chunk_interval_us=*,
                   bint scheduled=*, int n_logprobs=*) except -1
    cdef int start_thread(self) except -1
    cdef void release(self) noexcept
    cdef object take_chunk(self)
    cdef size_t take_locked(self, bint * oom) noexcept nogil
    cdef void finish(self)
    cdef GenerationResult build_result(self)
    cdef object describe_error(self)


cdef class Multimodal:
    cdef mtmd_context * ptr
    cdef readonly Model model
    cdef readonly str path
    cdef void _free(self)
    cdef int check_open(self) except -1


cdef class Chunks:
    cdef mtmd_input_chunks * ptr


# Never cleared by the cyclic GC (@cython.no_gc_clear on its definition): its
# thread uses the context until close().
cdef class Scheduler:
    cdef SchedState s
    cdef readonly Context context
    cdef pthread_t thread
    cdef bint running
    cdef bint sync_ready
    cdef void free_state(self) noexcept
    cdef void stop(self) noexcept
    cdef void kick(self) noexcept
    cdef void wait_released(self, GenState * g) noexcept
    cdef int wait_released_interruptibly(self, Generation gen) except -1
