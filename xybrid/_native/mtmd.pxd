# Declarations of the public C API of mtmd.h (multimodal input for llama.cpp)
# and the helpers of mtmd-helper.h that evaluate tokenized chunks.
#
# The audio *generation* part of mtmd.h (mtmd_gen_*) is left out: xybrid
# consumes media, it does not synthesise speech.

from libc.stdint cimport int32_t, uint32_t
from xybrid._native.llama cimport (
    ggml_backend_dev_t, ggml_log_callback, llama_context, llama_flash_attn_type,
    llama_model, llama_pos, llama_seq_id, llama_token,
)


cdef extern from "mtmd.h" nogil:
    enum mtmd_input_chunk_type:
        MTMD_INPUT_CHUNK_TYPE_TEXT
        MTMD_INPUT_CHUNK_TYPE_IMAGE
        MTMD_INPUT_CHUNK_TYPE_AUDIO

    ctypedef struct mtmd_context:
        pass
    ctypedef struct mtmd_bitmap:
        pass
    ctypedef struct mtmd_image_tokens:
        pass
    ctypedef struct mtmd_input_chunk:
        pass
    ctypedef struct mtmd_input_chunks:
        pass
    ctypedef struct mtmd_batch:
        pass

    ctypedef struct mtmd_input_text:
        const char * text
        size_t text_len
        bint add_special
        bint parse_special

    ctypedef struct mtmd_input_part:
        const mtmd_input_text * text
        const mtmd_bitmap * bitmap

    ctypedef bint (*mtmd_progress_callback)(float progress, void * user_data)

    cdef struct mtmd_context_params:
        bint use_gpu
        ggml_backend_dev_t device
        bint print_timings
        int n_threads
        const char * media_marker
        llama_flash_attn_type flash_attn_type
        bint warmup
        int image_min_tokens
        int image_max_tokens
        int32_t batch_max_tokens
        mtmd_progress_callback progress_callback
        void * progress_callback_user_data

    cdef struct mtmd_decoder_pos:
        uint32_t t
        uint32_t x
        uint32_t y
        uint32_t z

    cdef struct mtmd_caps:
        bint inp_vision
        bint inp_audio

    const char * mtmd_default_marker()
    mtmd_context_params mtmd_context_params_default()
    mtmd_context * mtmd_init_from_file(const char * mmproj_fname, const llama_model * text_model,
                                       const mtmd_context_params ctx_params)
    void mtmd_free(mtmd_context * ctx)
    bint mtmd_decode_use_non_causal(const mtmd_context * ctx, const mtmd_input_chunk * chunk)
    bint mtmd_decode_use_mrope(const mtmd_context * ctx)
    bint mtmd_support_vision(const mtmd_context * ctx)
    bint mtmd_support_audio(const mtmd_context * ctx)
    int mtmd_get_audio_sample_rate(const mtmd_context * ctx)
    const char * mtmd_get_marker(const mtmd_context * ctx)
    mtmd_caps mtmd_get_cap_from_file(const char * mmproj_fname)
    void mtmd_log_set(ggml_log_callback log_callback, void * user_data)

    # bitmaps: RGB images (nx * ny * 3 bytes) or f32 PCM audio
    mtmd_bitmap * mtmd_bitmap_init(uint32_t nx, uint32_t ny, const unsigned char * data)
    mtmd_bitmap * mtmd_bitmap_init_from_audio(size_t n_samples, const float * data)
    uint32_t mtmd_bitmap_get_nx(const mtmd_bitmap * bitmap)
    uint32_t mtmd_bitmap_get_ny(const mtmd_bitmap * bitmap)
    const unsigned char * mtmd_bitmap_get_data(const mtmd_bitmap * bitmap)
    size_t mtmd_bitmap_get_n_bytes(const mtmd_bitmap * bitmap)
    bint mtmd_bitmap_is_audio(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_free(mtmd_bitmap * bitmap)
    const char * mtmd_bitmap_get_id(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_set_id(mtmd_bitmap * bitmap, const char * id)
    void mtmd_bitmap_set_mergeable(mtmd_bitmap * bitmap, bint mergeable)

    # tokenized input: a list of text / image / audio chunks
    mtmd_input_chunks * mtmd_input_chunks_init()
    size_t mtmd_input_chunks_size(const mtmd_input_chunks * chunks)
    const mtmd_input_chunk * mtmd_input_chunks_get(const mtmd_input_chunks * chunks, size_t idx)
    void mtmd_input_chunks_free(mtmd_input_chunks * chunks)
    mtmd_input_chunk_type mtmd_input_chunk_get_type(const mtmd_input_chunk * chunk)
    const llama_token * mtmd_input_chunk_get_tokens_text(const mtmd_input_chunk * chunk, size_t * n_tokens_output)
    const mtmd_image_tokens * mtmd_input_chunk_get_tokens_image(const mtmd_input_chunk * chunk)
    size_t mtmd_input_chunk_get_n_tokens(const mtmd_input_chunk * chunk)
    const char * mtmd_input_chunk_get_id(const mtmd_input_chunk * chunk)
    llama_pos mtmd_input_chunk_get_n_pos(const mtmd_input_chunk * chunk)
    mtmd_input_chunk * mtmd_input_chunk_copy(const mtmd_input_chunk * chunk)
    void mtmd_input_chunk_free(mtmd_input_chunk * chunk)

    size_t mtmd_image_tokens_get_n_tokens(const mtmd_image_tokens * image_tokens)
    const char * mtmd_image_tokens_get_id(const mtmd_image_tokens * image_tokens)
    llama_pos mtmd_image_tokens_get_n_pos(const mtmd_image_tokens * image_tokens)
    mtmd_decoder_pos mtmd_image_tokens_get_decoder_pos(const mtmd_image_tokens * image_tokens,
                                                       llama_pos pos_0, size_t i)

    int32_t mtmd_tokenize(const mtmd_context * ctx, mtmd_input_chunks * output,
                          const mtmd_input_text * text, const mtmd_bitmap * const * bitmaps,
                          size_t n_bitmaps)
    int32_t mtmd_tokenize_from_parts(const mtmd_context * ctx, mtmd_input_chunks * output,
                                     const mtmd_input_part * const * parts, size_t n_parts,
                                     bint add_special)
    int32_t mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk)
    float * mtmd_get_output_embd(mtmd_context * ctx)

    mtmd_batch * mtmd_batch_init(mtmd_context * ctx)
    void mtmd_batch_free(mtmd_batch * batch)
    int32_t mtmd_batch_add_chunk(mtmd_batch * batch, const mtmd_input_chunk * chunk)
    int32_t mtmd_batch_encode(mtmd_batch * batch)
    float * mtmd_batch_get_output_embd(mtmd_batch * batch, const mtmd_input_chunk * chunk)


cdef extern from "mtmd-helper.h" nogil:
    cdef struct mtmd_helper_init_opt:
        pass
    cdef struct mtmd_helper_bitmap_wrapper:
        mtmd_bitmap * bitmap
    mtmd_helper_init_opt mtmd_helper_init_opt_default()
    # Decodes wav/mp3/flac (miniaudio, resampled to the encoder's rate) or
    # stb images from an encoded file in memory; bitmap is NULL on failure.
    mtmd_helper_bitmap_wrapper mtmd_helper_bitmap_init_from_buf(
        const mtmd_context * ctx, const unsigned char * buf, size_t length, bint placeholder,
        mtmd_helper_init_opt opt)
    size_t mtmd_helper_get_n_tokens(const mtmd_input_chunks * chunks)
    llama_pos mtmd_helper_get_n_pos(const mtmd_input_chunks * chunks)
    void mtmd_helper_log_set(ggml_log_callback log_callback, void * user_data)
    int32_t mtmd_helper_eval_chunks(mtmd_context * ctx, llama_context * lctx,
                                    const mtmd_input_chunks * chunks, llama_pos n_past,
                                    llama_seq_id seq_id, int32_t n_batch, bint logits_last,
                                    llama_pos * new_n_past)
    int32_t mtmd_helper_eval_chunk_single(mtmd_context * ctx, llama_context * lctx,
                                          const mtmd_input_chunk * chunk, llama_pos n_past,
                                          llama_seq_id seq_id, int32_t n_batch, bint logits_last,
                                          llama_pos * new_n_past)
