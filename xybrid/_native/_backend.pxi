# Process-wide llama.cpp state: backend initialisation, logging, system info.

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


cdef void ensure_backend():
    """Initialise llama.cpp once per process. It is never torn down: the OS
    reclaims it at exit, and re-initialising after a free is not supported."""
    global _backend_ready
    if _backend_ready:
        return
    with _backend_lock:
        if _backend_ready:
            return
        llama_log_set(xy_log_callback, NULL)
        set_log_level(os.environ.get("XYBRID_LOG_LEVEL", "none").lower())
        llama_backend_init()
        _backend_ready = True


def system_info():
    """llama.cpp's description of the CPU features and backends in use."""
    ensure_backend()
    return llama_print_system_info().decode("utf-8", "replace").strip()


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
