# Multimodal input through mtmd: a projector context, media bitmaps,
# tokenized chunks and their evaluation into a llama context.

MEDIA_KINDS = ("text", "image", "audio")


@cython.no_gc_clear  # see _engine.pxd
cdef class Multimodal:
    """The mtmd context of a multimodal projector (``mmproj``) paired with a model.

    Raises :class:`~xybrid.errors.ModelLoadError` when the projector cannot
    be loaded or does not fit the text model (the key or tensor at fault,
    found by :func:`xybrid.gguf_check.check_projector_file`, or llama.cpp's
    reason).
    """


    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, Model model not None, mmproj_path, *, int n_threads=0,
                 bint use_gpu=True, bint flash_attn=False):
        model.check_open()
        path = os.fspath(mmproj_path)
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"multimodal projector not found: {path}")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF projector file (magic bytes {magic!r})")
        # clip.cpp asserts on keys of the wrong type and builds graphs from
        # tensor shapes it never checks: refuse such files before it reads them.
        from xybrid.gguf_check import check_projector_file
        check_projector_file(path, text_n_embd=llama_model_n_embd(model.ptr))
        ensure_backend()
        mtmd_log_set(xy_log_callback, NULL)
        cdef mtmd_context_params params = mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        params.n_threads = n_threads or (os.cpu_count() or 1)
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else LLAMA_FLASH_ATTN_TYPE_DISABLED
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        take_log_tail()
        with nogil:
            self.ptr = mtmd_init_from_file(cpath, model.ptr, params)
        if self.ptr == NULL:
            reason = take_log_tail()
            raise ModelLoadError(
                f"llama.cpp could not load the projector {path}"
                + (f": {reason}" if reason else "")
                + " (is it the projector made for this model?)")
        self.model = model
        self.path = path
        model.n_contexts += 1

    def __dealloc__(self):
        self._free()

    cdef void _free(self):
        if self.ptr != NULL:
            mtmd_free(self.ptr)
            self.ptr = NULL
            if self.model is not None:
                self.model.n_contexts -= 1

    def close(self):
        self._free()

    cdef int check_open(self) except -1:
        if self.ptr == NULL:
            raise XybridError("the multimodal context has been closed")
        return 0

    @property
    def vision(self):
        self.check_open()
        return bool(mtmd_support_vision(self.ptr))

    @property
    def audio(self):
        self.check_open()
        return bool(mtmd_support_audio(self.ptr))

    @property
    def audio_sample_rate(self):
        """PCM sample rate the audio encoder expects (Hz), or None without audio."""
        self.check_open()
        cdef int rate = mtmd_get_audio_sample_rate(self.ptr)
        return rate if rate > 0 else None

    @property
    def marker(self):
        """The text that marks where each media item goes in the prompt."""
        self.check_open()
        return mtmd_get_marker(self.ptr).decode("utf-8")

    def tokenize(self, str text, media, *, bint add_special=True, bint parse_special=True):
        """Split ``text`` at the media markers and tokenize it with the media.

        ``media`` is a list of ``("image", rgb_bytes, width, height)`` and
        ``("audio", float32_pcm_bytes)`` items, one per marker, in order.
        """
        self.check_open()
        cdef Py_ssize_t n = len(media), i
        cdef mtmd_bitmap ** bitmaps = <mtmd_bitmap **> malloc(max(n, 1) * sizeof(mtmd_bitmap *))
        if bitmaps == NULL:
            raise MemoryError()
        for i in range(n):
            bitmaps[i] = NULL
        cdef const unsigned char[::1] data
        cdef mtmd_input_text itext
        cdef bytes btext = encode_text(text, "text")
        cdef int32_t rc
        cdef Chunks chunks = Chunks.__new__(Chunks)
        try:
            for i in range(n):
                item = media[i]
                kind = item[0]
                if kind == "image":
                    _, raw, width, height = item
                    if width <= 0 or height <= 0 or len(raw) != width * height * 3:
                        raise InvalidInputError(
                            f"media {i}: an RGB image of {width}x{height} needs {width * height * 3} bytes, "
                            f"got {len(raw)}")
                    if not self.vision:
                        raise InvalidInputError(f"media {i}: this projector has no vision encoder")
                    data = raw
                    bitmaps[i] = mtmd_bitmap_init(width, height, &data[0])
                elif kind == "audio":
                    raw = item[1]
                    if len(raw) == 0 or len(raw) % 4:
                        raise InvalidInputError(f"media {i}: audio must be non-empty float32 PCM")
                    # mtmd asserts (aborts the process) on a clip of one sample.
                    if len(raw) < 8:
                        raise InvalidInputError(f"media {i}: an audio clip needs at least 2 samples")
                    if not self.audio:
                        raise InvalidInputError(f"media {i}: this projector has no audio encoder")
                    data = raw
                    bitmaps[i] = mtmd_bitmap_init_from_audio(len(raw) // 4, <const float *> &data[0])
                elif kind == "audio_file":
                    # An encoded wav/mp3/flac file: miniaudio (inside mtmd)
                    # decodes it and resamples to the encoder's rate.
                    raw = item[1]
                    if not self.audio:
                        raise InvalidInputError(f"media {i}: this projector has no audio encoder")
                    if len(raw) == 0:
                        raise InvalidInputError(f"media {i}: the audio file is empty")
                    data = raw
                    bitmaps[i] = mtmd_helper_bitmap_init_from_buf(
                        self.ptr, &data[0], len(raw), False, mtmd_helper_init_opt_default()).bitmap
                    if bitmaps[i] == NULL:
                        raise InvalidInputError(f"media {i}: not a readable wav, mp3 or flac file")
                    if not mtmd_bitmap_is_audio(bitmaps[i]):
                        raise InvalidInputError(f"media {i}: the file is an image, not audio")
                    if mtmd_bitmap_get_n_bytes(bitmaps[i]) < 8:  # as for PCM above
                        raise InvalidInputError(f"media {i}: the audio file decodes to fewer than 2 samples")
                else:
                    raise InvalidInputError(f"media {i}: unknown kind {kind!r}")
                if bitmaps[i] == NULL:
                    raise MemoryError(f"media {i}: mtmd could not create the bitmap")
            chunks.ptr = mtmd_input_chunks_init()
            if chunks.ptr == NULL:
                raise MemoryError("mtmd_input_chunks_init failed")
            itext.text = btext
            itext.text_len = len(btext)
            itext.add_special = add_special
            itext.parse_special = parse_special
            take_log_tail()
            with nogil:
                rc = mtmd_tokenize(self.ptr, chunks.ptr, &itext, <const mtmd_bitmap * const *> bitmaps, n)
            if rc == 1:
                raise InvalidInputError(
                    f"the prompt has {text.count(self.marker)} media marker(s) {self.marker!r} "
                    f"but {n} media item(s) were given")
            if rc != 0:
                reason = take_log_tail()
                raise InvalidInputError("mtmd could not preprocess the media"
                                        + (f": {reason}" if reason else f" (code {rc})"))
            _check_chunk_tokens(chunks, self.model.vocab, self.path)
            return chunks
        finally:
            for i in range(n):
                if bitmaps[i] != NULL:
                    mtmd_bitmap_free(bitmaps[i])
            free(bitmaps)


cdef int _check_chunk_tokens(Chunks chunks, const llama_vocab * vocab, str path) except -1:
    """Refuse text chunks holding a token the vocabulary does not have.

    For many projector types mtmd frames an image with marker tokens
    (``<fake_token_around_image>``, ``<slice>``, ``[IMG_END]``, ...) that
    it looks up by text in the model's vocabulary, and writes -1 where one is
    missing: a projector paired with a model of another family. Decoding such
    a chunk aborts inside llama.cpp (``GGML_ASSERT(idx >= 0)`` in mtmd's
    helper), so it is an error here, before anything is decoded."""
    cdef int32_t n_vocab = llama_vocab_n_tokens(vocab)
    cdef size_t i, j, n = 0
    cdef const mtmd_input_chunk * c
    cdef const llama_token * toks
    for i in range(mtmd_input_chunks_size(chunks.ptr)):
        c = mtmd_input_chunks_get(chunks.ptr, i)
        if mtmd_input_chunk_get_type(c) != MTMD_INPUT_CHUNK_TYPE_TEXT:
            continue
        toks = mtmd_input_chunk_get_tokens_text(c, &n)
        for j in range(n):
            if toks[j] < 0 or toks[j] >= n_vocab:
                raise UnsupportedInputError(
                    f"the projector {path} frames media with a token the text model's vocabulary does "
                    f"not have (token id {toks[j]} in chunk {i}); it was made for another model")
    return 0


cdef class Chunks:
    """A prompt tokenized with its media: text, image and audio chunks."""


    def __cinit__(self):
        self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            mtmd_input_chunks_free(self.ptr)
            self.ptr = NULL

    def __len__(self):
        return 0 if self.ptr == NULL else mtmd_input_chunks_size(self.ptr)

    @property
    def n_tokens(self):
        """Tokens in all chunks (media embeddings count one per position)."""
        return int(mtmd_helper_get_n_tokens(self.ptr))

    @property
    def n_pos(self):
        """Positions the prompt occupies in the sequence."""
        return int(mtmd_helper_get_n_pos(self.ptr))

    def summary(self):
        """Per chunk: (kind, n_tokens)."""
        cdef size_t i
        cdef const mtmd_input_chunk * c
        out = []
        for i in range(mtmd_input_chunks_size(self.ptr)):
            c = mtmd_input_chunks_get(self.ptr, i)
            out.append((MEDIA_KINDS[<int> mtmd_input_chunk_get_type(c)], int(mtmd_input_chunk_get_n_tokens(c))))
        return out

    def media_tokens(self):
        """Tokens taken by images and by audio: {"image": n, "audio": n}."""
        counts = {"image": 0, "audio": 0}
        for kind, n in self.summary():
            if kind != "text":
                counts[kind] += n
        return counts
