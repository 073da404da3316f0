# Remote devices: ggml's RPC backend, as a client (a model's layers on
# `xybrid rpc-server` processes) and as a server. The Python side
# (xybrid/rpc.py) probes servers before anything here connects to them.

cdef extern from "ggml-rpc.h":
    int RPC_PROTO_MAJOR_VERSION
    int RPC_PROTO_MINOR_VERSION
    int RPC_PROTO_PATCH_VERSION


RPC_PROTOCOL = (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)


cdef int ensure_rpc() except -1:
    ensure_backend()
    from xybrid._build_info import RPC
    if not RPC:
        raise XybridError("this build of xybrid has no RPC backend (it was built with -Drpc=false)")
    if xy_rpc_bind() != 0:
        raise XybridError("ggml's RPC backend could not be found in this installation: reinstall xybrid")
    return 0


def supports_rpc():
    """True when this build can use and run RPC servers."""
    try:
        ensure_rpc()
    except XybridError:
        return False
    return True


def rpc_recovers():
    """True when a lost RPC server is a typed error, not a process abort
    (the build carries xybrid's ggml-rpc patch)."""
    ensure_rpc()
    return xy_rpc_api.failure_count != NULL


def rpc_failure_count():
    """How many RPC connections failed in this process so far."""
    ensure_rpc()
    return int(xy_rpc_failures())


def rpc_last_failure():
    """The last RPC failure, as "host:port: reason" ("" if none)."""
    ensure_rpc()
    cdef char buf[512]
    if xy_rpc_api.last_failure == NULL:
        return ""
    cdef size_t n = xy_rpc_api.last_failure(buf, sizeof(buf))
    return buf[:n].decode("utf-8", "replace")


cdef object rpc_lost_error(str when):
    from xybrid.errors import RemoteServerError
    last = rpc_last_failure()
    endpoint, _, reason = last.partition(": ")
    return RemoteServerError(
        f"RPC server {endpoint or '(unknown)'} failed {when} ({reason or 'no reason given'}): "
        f"the result is discarded; load the model again once the server is back",
        endpoint=endpoint or None)


cdef int rpc_add_devices(list endpoints, ggml_backend_dev_t * devs, size_t cap, list info) except -1:
    """Connect to each server and append its devices to ``devs`` (at most
    ``cap``) and a description of each to ``info``; returns the count."""
    cdef size_t n = 0, i, k, free_mem, total_mem
    cdef ggml_backend_reg_t reg
    cdef bytes bep
    cdef const char * cep
    cdef uint64_t before
    for ep in endpoints:
        bep = ep.encode("ascii")
        cep = bep
        before = xy_rpc_failures()
        with nogil:
            reg = xy_rpc_api.add_server(cep)
        if reg == NULL or xy_rpc_failures() != before:
            from xybrid.errors import RemoteServerError
            raise RemoteServerError(
                f"RPC server {ep} offered no device: {rpc_last_failure() or 'no reply'}", endpoint=ep)
        k = ggml_backend_reg_dev_count(reg)
        for i in range(k):
            if n >= cap:
                raise InvalidInputError(
                    f"the RPC servers offer more than the {cap} devices llama.cpp can split a model over")
            devs[n] = ggml_backend_reg_dev_get(reg, i)
            free_mem = total_mem = 0
            with nogil:
                ggml_backend_dev_memory(devs[n], &free_mem, &total_mem)
            info.append({
                "name": ggml_backend_dev_name(devs[n]).decode("utf-8", "replace"),
                "endpoint": ep,
                "memory_free": int(free_mem),
                "memory_total": int(total_mem),
            })
            n += 1
    return <int> n


def rpc_serve(str endpoint, cache_dir, int n_threads, size_t mem_bytes):
    """Serve this machine's CPU to RPC clients at ``endpoint`` ("host:port").

    Blocks for as long as the server runs, with the GIL released; it returns
    only when the server could not start (the socket could not be bound).
    ``mem_bytes`` > 0 caps the memory the server reports, which clients
    split layers by. Run it on a thread of its own so that the main thread
    can still take signals (``xybrid rpc-server`` does).
    """
    ensure_rpc()
    if n_threads <= 0:
        raise InvalidInputError(f"n_threads must be a positive integer, got {n_threads}")
    cdef ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if dev == NULL:
        raise XybridError("no CPU device to serve")
    if mem_bytes > 0:
        dev = xy_capped_device(dev, mem_bytes)
        if dev == NULL:
            raise MemoryError()
    cdef bytes bep = endpoint.encode("ascii")
    cdef const char * cep = bep
    cdef bytes bcache = os.fsencode(cache_dir) if cache_dir is not None else b""
    cdef const char * ccache = NULL
    if cache_dir is not None:
        ccache = bcache
    cdef size_t threads = n_threads
    with nogil:
        xy_rpc_api.start_server(cep, ccache, threads, 1, &dev)
