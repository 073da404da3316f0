# Model: weights, vocabulary and GGUF metadata; tokenizer primitives.

cdef class Model:
    """A GGUF model loaded by llama.cpp.

    ``Model(path, gpu_layers=0, use_mmap=True, vocab_only=False,
    rpc_servers=(), tensor_split=())``. The file must exist and be a GGUF
    that this llama.cpp understands; otherwise
    :class:`~xybrid.errors.ModelNotFoundError` or
    :class:`~xybrid.errors.ModelLoadError` (naming the key or tensor at
    fault, found by :func:`xybrid.gguf_check.check_model_file` before
    llama.cpp reads the file, or quoting llama.cpp's reason).

    ``rpc_servers`` ("host:port" each, already probed by xybrid.rpc) are the
    only devices ``gpu_layers`` are offloaded to, split by ``tensor_split``
    (one weight per device, in order; empty: by the memory each reports).
    """


    def __cinit__(self):
        self.ptr = NULL
        self.vocab = NULL
        self.n_contexts = 0
        self.rpc_base = XY_RPC_UNUSED
        self.rpc_devices = ()

    def __init__(self, path, *, int gpu_layers=0, bint use_mmap=True, bint vocab_only=False,
                 rpc_servers=(), tensor_split=()):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"model path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)
        if not isinstance(path, str):
            path = os.fsdecode(path)
        if not os.path.exists(path):
            raise ModelNotFoundError(f"model file not found: {path}")
        if os.path.isdir(path):
            raise ModelLoadError(f"{path} is a directory; pass a .gguf file (xybrid.resolve_model_path picks one)")
        if gpu_layers < -1:
            raise InvalidInputError(f"gpu_layers must be >= -1 (-1 = all), got {gpu_layers}")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {magic!r})")
        # llama.cpp asserts (ends the process) on some malformed metadata and
        # tensor shapes: refuse those files before it reads them.
        from xybrid.gguf_check import check_model_file
        check_model_file(path, vocab_only=vocab_only)
        ensure_backend()
        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = gpu_layers if gpu_layers >= 0 else 2147483647
        params.vocab_only = vocab_only
        params.load_mode = LLAMA_LOAD_MODE_MMAP if use_mmap else LLAMA_LOAD_MODE_NONE
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        cdef size_t max_dev = llama_max_devices()
        cdef ggml_backend_dev_t * devs = NULL
        cdef float * split = NULL
        cdef int n_dev = 0, i
        cdef uint64_t rpc_base = XY_RPC_UNUSED
        rpc_info = []
        try:
            if rpc_servers:
                ensure_rpc()
                devs = <ggml_backend_dev_t *> calloc(max_dev + 1, sizeof(ggml_backend_dev_t))
                split = <float *> calloc(max_dev, sizeof(float))
                if devs == NULL or split == NULL:
                    raise MemoryError()
                rpc_base = xy_rpc_failures()
                n_dev = rpc_add_devices(list(rpc_servers), devs, max_dev, rpc_info)
                params.devices = devs   # NULL-terminated by calloc
                if tensor_split:
                    if len(tensor_split) != n_dev:
                        raise InvalidInputError(
                            f"tensor_split has {len(tensor_split)} entries but the RPC servers "
                            f"offer {n_dev} device(s): give one weight per device, in order")
                    for i in range(n_dev):
                        split[i] = tensor_split[i]
                    params.tensor_split = split
            take_log_tail()
            with nogil:
                self.ptr = llama_model_load_from_file(cpath, params)
        finally:
            free(devs)
            free(split)
        if rpc_servers and xy_rpc_lost(rpc_base):
            if self.ptr != NULL:
                llama_model_free(self.ptr)
                self.ptr = NULL
            raise rpc_lost_error("while loading the model")
        self.rpc_base = rpc_base
        self.rpc_devices = tuple(rpc_info)
        if self.ptr == NULL:
            reason = take_log_tail()
            raise ModelLoadError(
                f"llama.cpp could not load {path}" + (f": {reason}" if reason else "")
                + " (a truncated or corrupt file, or an architecture this llama.cpp does not support)")
        self.vocab = llama_model_get_vocab(self.ptr)
        self.path = path
        self.vocab_only = vocab_only

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL

    cdef int check_open(self) except -1:
        if self.ptr == NULL:
            raise XybridError("the model has been closed")
        return 0

    def close(self):
        """Free the weights now. Contexts created from this model must be closed first."""
        if self.n_contexts > 0:
            raise XybridError(f"cannot close the model: {self.n_contexts} context(s) still use it")
        if self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL
            self.vocab = NULL

    @property
    def closed(self):
        return self.ptr == NULL

    @property
    def rpc_lost(self):
        """True when an RPC server this model uses was lost since it loaded:
        its results can no longer be trusted, it must be loaded again."""
        return bool(xy_rpc_lost(self.rpc_base))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.ptr == NULL:
            return "<xybrid Model (closed)>"
        return f"<xybrid Model {self.description!r} from {self.path!r}>"

    # --- facts -----------------------------------------------------------------
    @property
    def n_ctx_train(self):
        self.check_open()
        return llama_model_n_ctx_train(self.ptr)

    @property
    def max_piece_bytes(self):
        """The longest text any single token stands for, in bytes (special
        tokens spelt out). A text of more than ``n * max_piece_bytes`` bytes
        is certain to tokenize to more than ``n`` tokens, which lets a prompt
        far past the context be refused before it is tokenized."""
        self.check_open()
        cdef char buf[512]
        cdef int32_t n_vocab = llama_vocab_n_tokens(self.vocab)
        cdef int32_t longest = 1
        cdef int32_t n, i
        with nogil:
            for i in range(n_vocab):
                n = xy_token_to_piece(self.vocab, i, buf, sizeof(buf), 0, 1)
                if n == XY_CALL_FAILED:
                    continue
                if n < 0:
                    n = -n
                if n > longest:
                    longest = n
        return longest

    @property
    def n_embd(self):
        self.check_open()
        return llama_model_n_embd(self.ptr)

    @property
    def n_layer(self):
        self.check_open()
        return llama_model_n_layer(self.ptr)

    @property
    def n_params(self):
        self.check_open()
        return int(llama_model_n_params(self.ptr))

    @property
    def size(self):
        """Bytes of tensor data."""
        self.check_open()
        return int(llama_model_size(self.ptr))

    @property
    def n_vocab(self):
        self.check_open()
        return llama_vocab_n_tokens(self.vocab)

    @property
    def description(self):
        self.check_open()
        cdef char buf[256]
        cdef int32_t n = llama_model_desc(self.ptr, buf, sizeof(buf))
        return buf[:max(0, min(n, <int32_t>sizeof(buf) - 1))].decode("utf-8", "replace")

    @property
    def is_recurrent(self):
        self.check_open()
        return bool(llama_model_is_recurrent(self.ptr))

    @property
    def is_hybrid(self):
        self.check_open()
        return bool(llama_model_is_hybrid(self.ptr))

    @property
    def has_recurrent_state(self):
        """Recurrent or hybrid: the cache cannot be truncated by position."""
        self.check_open()
        return bool(llama_model_is_recurrent(self.ptr) or llama_model_is_hybrid(self.ptr))

    @property
    def has_encoder(self):
        self.check_open()
        return bool(llama_model_has_encoder(self.ptr))

    @property
    def architecture(self):
        return self.meta("general.architecture")

    @property
    def name(self):
        """GGUF ``general.name``, or None."""
        return self.meta("general.name")

    def meta(self, str key):
        """One GGUF metadata value as a string, or None when absent."""
        self.check_open()
        cdef bytes bkey = encode_text(key, "metadata key")
        cdef int32_t size = 256
        cdef int32_t n
        cdef char * buf
        while True:
            buf = <char *> malloc(size)
            if buf == NULL:
                raise MemoryError()
            try:
                n = llama_model_meta_val_str(self.ptr, bkey, buf, size)
                if n < 0:
                    return None
                if n < size:
                    return buf[:n].decode("utf-8", "replace")
                size = n + 1
            finally:
                free(buf)

    def metadata(self):
        """All GGUF metadata as a dict of strings (arrays are summarised by llama.cpp)."""
        self.check_open()
        cdef int32_t i, n
        cdef char kbuf[512]
        cdef char * vbuf = <char *> malloc(65536)
        if vbuf == NULL:
            raise MemoryError()
        out = {}
        try:
            for i in range(llama_model_meta_count(self.ptr)):
                n = llama_model_meta_key_by_index(self.ptr, i, kbuf, sizeof(kbuf))
                if n < 0:
                    continue
                key = kbuf[:min(n, <int32_t>sizeof(kbuf) - 1)].decode("utf-8", "replace")
                n = llama_model_meta_val_str_by_index(self.ptr, i, vbuf, 65536)
                if n < 0:
                    continue
                out[key] = vbuf[:min(n, 65535)].decode("utf-8", "replace")
        finally:
            free(vbuf)
        return out

    def chat_template(self, name=None):
        """The chat template stored in the GGUF (``tokenizer.chat_template``), or None."""
        self.check_open()
        cdef bytes bname
        cdef const char * cname = NULL
        if name is not None:
            bname = encode_text(name, "name")
            cname = bname
        cdef const char * tmpl = llama_model_chat_template(self.ptr, cname)
        if tmpl == NULL:
            return None
        return tmpl.decode("utf-8", "replace")

    # --- vocabulary ----------------------------------------------------------------
    @property
    def bos_token(self):
        self.check_open()
        return llama_vocab_bos(self.vocab)

    @property
    def eos_token(self):
        self.check_open()
        return llama_vocab_eos(self.vocab)

    @property
    def eot_token(self):
        self.check_open()
        return llama_vocab_eot(self.vocab)

    @property
    def add_bos(self):
        self.check_open()
        return bool(llama_vocab_get_add_bos(self.vocab))

    def token_text(self, int token):
        """The vocabulary entry of a token as stored (special markers included)."""
        self.check_token(token)
        return llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def is_eog(self, int token):
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        self.check_token(token)
        return bool(llama_vocab_is_eog(self.vocab, token))

    cdef int check_token(self, int token) except -1:
        self.check_open()
        if token < 0 or token >= llama_vocab_n_tokens(self.vocab):
            raise InvalidInputError(
                f"token id {token} is outside the vocabulary (0..{llama_vocab_n_tokens(self.vocab) - 1})")
        return 0

    def tokenize(self, text, *, bint add_special=True, bint parse_special=False):
        """Token ids of ``text``.

        ``add_special`` adds the BOS (and EOS where the model wants it);
        ``parse_special`` turns markers such as ``<start_of_turn>`` into their
        single special token instead of spelling them out.
        """
        self.check_open()
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        cdef bytes data = encode_text(text, "text")
        if len(data) > 0x7FFFFFFF - 16:
            raise InvalidInputError("text is too long to tokenize (more than 2 GiB)")
        cdef int32_t cap = <int32_t> len(data) + 16
        cdef int32_t n
        cdef llama_token * toks = <llama_token *> malloc(cap * sizeof(llama_token))
        if toks == NULL:
            raise MemoryError()
        try:
            n = xy_tokenize(self.vocab, data, <int32_t> len(data), toks, cap, add_special, parse_special)
            if n < 0 and n != XY_CALL_FAILED:
                cap = -n
                free(toks)
                toks = <llama_token *> malloc(cap * sizeof(llama_token))
                if toks == NULL:
                    raise MemoryError()
                n = xy_tokenize(self.vocab, data, <int32_t> len(data), toks, cap, add_special, parse_special)
            if n == XY_CALL_FAILED:
                reason = take_log_tail().strip()
                raise InvalidInputError("llama.cpp could not tokenize the text"
                                        + (f": {reason}" if reason else ""))
            if n < 0:
                raise InvalidInputError("llama.cpp could not tokenize the text (too many tokens)")
            return [toks[i] for i in range(n)]
        finally:
            free(toks)

    def token_to_piece(self, int token, *, bint special=False):
        """The bytes a token stands for. Special tokens render as empty unless ``special``."""
        self.check_token(token)
        cdef char buf[256]
        cdef int32_t n = xy_token_to_piece(self.vocab, token, buf, sizeof(buf), 0, special)
        cdef char * big
        if n == XY_CALL_FAILED:
            raise XybridError("llama.cpp could not render the token: " + take_log_tail().strip())
        if n >= 0:
            return buf[:n]
        big = <char *> malloc(-n)
        if big == NULL:
            raise MemoryError()
        try:
            n = xy_token_to_piece(self.vocab, token, big, -n, 0, special)
            return big[:max(n, 0)]
        finally:
            free(big)

    def detokenize(self, tokens, *, bint remove_special=False, bint unparse_special=False):
        """Text of a token sequence (invalid UTF-8 is replaced, never raised)."""
        self.check_open()
        cdef Py_ssize_t count = len(tokens)
        cdef int32_t n_vocab = llama_vocab_n_tokens(self.vocab)
        cdef llama_token * toks = <llama_token *> malloc(max(count, 1) * sizeof(llama_token))
        cdef char * text = NULL
        cdef int32_t cap, n
        cdef Py_ssize_t i
        if toks == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                t = tokens[i]
                if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= n_vocab:
                    raise InvalidInputError(f"tokens[{i}] = {t!r} is not a token id of this vocabulary")
                toks[i] = t
            cap = <int32_t> (count * 8 + 16)
            text = <char *> malloc(cap)
            if text == NULL:
                raise MemoryError()
            n = xy_detokenize(self.vocab, toks, <int32_t> count, text, cap, remove_special, unparse_special)
            if n < 0 and n != XY_CALL_FAILED:
                cap = -n + 1
                free(text)
                text = <char *> malloc(cap)
                if text == NULL:
                    raise MemoryError()
                n = xy_detokenize(self.vocab, toks, <int32_t> count, text, cap, remove_special, unparse_special)
            if n < 0:
                raise XybridError("llama.cpp could not detokenize the sequence")
            return text[:n].decode("utf-8", "replace")
        finally:
            free(toks)
            free(text)


def apply_builtin_chat_template(str template, messages, bint add_generation_prompt=True):
    """Format messages with llama.cpp's built-in template matcher.

    ``template`` is a template source or a known name ("chatml", "gemma", ...).
    Returns None when llama.cpp does not recognise the template, so callers can
    fall back to a full Jinja renderer.
    """
    ensure_backend()
    cdef Py_ssize_t n = len(messages)
    cdef llama_chat_message * chat = <llama_chat_message *> malloc(max(n, 1) * sizeof(llama_chat_message))
    if chat == NULL:
        raise MemoryError()
    keep = []
    cdef bytes btmpl = encode_text(template, "chat template")
    cdef int32_t cap, needed
    cdef char * buf = NULL
    cdef Py_ssize_t i
    try:
        for i in range(n):
            role, content = messages[i]
            brole = encode_text(role, "message role")
            bcontent = encode_text(content, "message content")
            keep.append((brole, bcontent))
            chat[i].role = brole
            chat[i].content = bcontent
        cap = 256
        for i in range(n):
            cap += len(keep[i][1]) * 2 + 64
        buf = <char *> malloc(cap)
        if buf == NULL:
            raise MemoryError()
        needed = xy_chat_apply_template(btmpl, chat, n, add_generation_prompt, buf, cap)
        if needed < 0:
            take_log_tail()
            return None
        if needed > cap:
            free(buf)
            cap = needed + 1
            buf = <char *> malloc(cap)
            if buf == NULL:
                raise MemoryError()
            needed = xy_chat_apply_template(btmpl, chat, n, add_generation_prompt, buf, cap)
            if needed < 0:
                return None
        return buf[:needed].decode("utf-8", "replace")
    finally:
        free(chat)
        free(buf)
