# Process-wide llama.cpp state: backend initialisation, logging, system info.


cdef extern from "ggml-backend.h" nogil:
    cdef struct ggml_backend_feature:
        const char * name
        const char * value
    ctypedef ggml_backend_feature * (*ggml_backend_get_features_t)(ggml_backend_reg_t reg)

    void ggml_backend_load_all_from_path(const char * dir_path)
    ggml_backend_dev_t ggml_backend_dev_by_type(ggml_backend_dev_type type)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)
    void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name)


cdef extern from *:
    """
    #include <dlfcn.h>
    /* The file of the shared library that holds addr (NULL if unknown): tells
     * which CPU backend module ggml picked. */
    static const char *xy_library_of(void *addr) {
        Dl_info info;
        if (addr != NULL && dladdr(addr, &info) && info.dli_fname != NULL) return info.dli_fname;
        return NULL;
    }
    """
    const char * xy_library_of(void * addr) nogil


LOG_LEVELS = {
    "debug": GGML_LOG_LEVEL_DEBUG,
    "info": GGML_LOG_LEVEL_INFO,
    "warn": GGML_LOG_LEVEL_WARN,
    "warning": GGML_LOG_LEVEL_WARN,
    "error": GGML_LOG_LEVEL_ERROR,
    "none": GGML_LOG_LEVEL_ERROR + 100,
}

cdef bint _backend_ready = False
_backend_lock = threading.Lock()


def set_log_level(level):
    """Print llama.cpp log lines at or above ``level`` to stderr.

    ``level`` is one of "debug", "info", "warn", "error", "none" (the default,
    overridable with the ``XYBRID_LOG_LEVEL`` environment variable). Warnings
    and errors are always kept so that a failure can quote them.
    """
    if level not in LOG_LEVELS:
        raise InvalidInputError(
            f"log level must be one of {sorted(LOG_LEVELS)}, got {level!r}")
    xy_log_set_print_level(LOG_LEVELS[level])


cdef str take_log_tail():
    """The warnings and errors llama.cpp logged since the last call."""
    cdef char buf[4096]
    cdef size_t n = xy_log_take(buf, sizeof(buf))
    return buf[:n].decode("utf-8", "replace").strip()


cdef object checked_int(str name, object value, object low, object high):
    """``value`` as a Python int in [low, high], else InvalidInputError: a C
    int argument given a Python int out of its range would otherwise be an
    OverflowError (or wrap around)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidInputError(f"{name} must be in [{low}, {high}], got {value}")
    return value


cdef bytes encode_text(str text, str what):
    """UTF-8 bytes of ``text``; a lone surrogate (which UTF-8 cannot hold) is
    InvalidInputError naming where it sits, not a UnicodeEncodeError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} contains a lone surrogate U+{ord(text[exc.start]):04X} at index "
            f"{exc.start}; it is not a character and cannot be encoded") from None


cdef int ensure_backend() except -1:
    """Initialise llama.cpp once per process. It is never torn down: the OS
    reclaims it at exit, and re-initialising after a free is not supported."""
    global _backend_ready
    if _backend_ready:
        return 0
    with _backend_lock:
        if _backend_ready:
            return 0
        llama_log_set(xy_log_callback, NULL)
        set_log_level(os.environ.get("XYBRID_LOG_LEVEL", "none").lower())
        from xybrid._build_info import BACKEND_DL
        if BACKEND_DL:
            _load_backends()
        llama_backend_init()
        _backend_ready = True
    return 0


cdef int _load_backends() except -1:
    """Portable builds: load ggml's backends from this package's own folder.

    Only that folder is searched, never the current directory or the
    interpreter's (ggml's default search path); ggml scores every
    libggml-cpu-<variant> module there against this CPU and keeps the best.
    """
    native_dir = os.path.dirname(os.path.abspath(__file__))
    cdef bytes bdir = os.fsencode(native_dir)
    ggml_backend_load_all_from_path(bdir)
    if ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU) == NULL:
        found = sorted(f for f in os.listdir(native_dir) if f.startswith("libggml-cpu"))
        raise XybridError(
            f"no ggml CPU backend could be loaded from {native_dir} (found {found}); "
            f"the installation is incomplete: reinstall xybrid")
    return 0


def system_info():
    """llama.cpp's description of the CPU features and backends in use."""
    ensure_backend()
    return llama_print_system_info().decode("utf-8", "replace").strip()


def cpu_backend():
    """The CPU backend in use: a dict with ``variant`` (the CPU generation a
    portable build picked at run time, e.g. "haswell" or "zen4"; None for a
    build with one built-in CPU backend), ``library`` (its file) and
    ``features`` (the instruction sets it was compiled for)."""
    ensure_backend()
    cdef ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    cdef ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev) if dev != NULL else NULL
    cdef void * fn = ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features") if reg != NULL else NULL
    cdef const char * lib = xy_library_of(fn)
    cdef ggml_backend_feature * feat
    features = {}
    if fn != NULL:
        feat = (<ggml_backend_get_features_t> fn)(reg)
        while feat != NULL and feat.name != NULL:
            features[feat.name.decode("utf-8", "replace")] = feat.value.decode("utf-8", "replace")
            feat += 1
    library = os.fsdecode(lib) if lib != NULL else None
    variant = None
    if library is not None:
        stem = os.path.basename(library).split(".")[0]  # libggml-cpu-zen4.so -> libggml-cpu-zen4
        if stem.startswith("libggml-cpu-"):
            variant = stem[len("libggml-cpu-"):]
    return {"variant": variant, "library": library, "features": features}


def supports_gpu_offload():
    """True when the build has a GPU backend (CUDA, Metal, ...)."""
    ensure_backend()
    return bool(llama_supports_gpu_offload())


def devices():
    """The compute devices ggml can use: a list of dicts with name, description,
    type ("cpu", "gpu", "igpu", "accel") and memory in bytes."""
    ensure_backend()
    cdef size_t i, free_mem, total_mem
    cdef ggml_backend_dev_t dev
    kinds = {GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
             GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}
    out = []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        free_mem = 0
        total_mem = 0
        ggml_backend_dev_memory(dev, &free_mem, &total_mem)
        out.append({
            "name": ggml_backend_dev_name(dev).decode("utf-8", "replace"),
            "description": ggml_backend_dev_description(dev).decode("utf-8", "replace"),
            "type": kinds.get(ggml_backend_dev_get_type(dev), "unknown"),
            "memory_total": int(total_mem),
            "memory_free": int(free_mem),
        })
    return out


def monotonic_ns():
    """The clock the engine stamps tokens with (CLOCK_MONOTONIC, nanoseconds)."""
    return xy_now_ns()


# The sizes checked here end up in 32-bit fields of llama.cpp's parameter
# structs; a larger value would surface as a bare OverflowError from the
# conversion instead of a typed error that names the parameter.
cdef int64_t MAX_SIZE_PARAM = 0x7FFFFFFF


cdef int check_positive(str name, object value) except -1:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value > MAX_SIZE_PARAM:
        raise InvalidInputError(f"{name} must be a positive integer below 2**31, got {value!r}")
    return 0


cdef int check_non_negative(str name, object value) except -1:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > MAX_SIZE_PARAM:
        raise InvalidInputError(f"{name} must be a non-negative integer below 2**31, got {value!r}")
    return 0
