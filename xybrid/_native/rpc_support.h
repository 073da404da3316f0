/* ggml's RPC backend, as the engine uses it: the entry points (looked up on
 * the backend's registration, so the same code serves a build where
 * libggml-rpc is linked in and a portable one where it is a module loaded at
 * run time), the check that a remote server is still there, and a CPU device
 * that reports a capped amount of memory for `xybrid rpc-server --mem`.
 *
 * Threads: xy_rpc_bind() runs once, with the GIL, before anything else here;
 * afterwards the table is read-only and every function may be called from
 * any thread. The failure counter lives in the patched ggml-rpc
 * (scripts/patches/0001-ggml-rpc-survive-lost-connection.patch) and is atomic.
 */
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
/* ggml's internal device and backend structs: needed to wrap a device. The
 * header is part of the pinned source; the layout is checked by the build
 * (this file compiles against it) and by tests/test_rpc.py (--mem). */
#include "ggml-backend-impl.h"

typedef ggml_backend_reg_t (*xy_rpc_add_server_fn)(const char *endpoint);
typedef void (*xy_rpc_start_server_fn)(const char *endpoint, const char *cache_dir, size_t n_threads,
                                       size_t n_devices, ggml_backend_dev_t *devices);
typedef uint64_t (*xy_rpc_failure_count_fn)(void);
typedef size_t (*xy_rpc_last_failure_fn)(char *buf, size_t size);

typedef struct {
    int bound;                          /* 1 once xy_rpc_bind() found the backend */
    xy_rpc_add_server_fn add_server;
    xy_rpc_start_server_fn start_server;
    xy_rpc_failure_count_fn failure_count;  /* NULL without xybrid's patch */
    xy_rpc_last_failure_fn last_failure;    /* NULL without xybrid's patch */
} xy_rpc_api_t;

static xy_rpc_api_t xy_rpc_api = {0, NULL, NULL, NULL, NULL};

/* 0 when the RPC backend is there (with or without the patch), -1 if not. */
static int xy_rpc_bind(void) {
    if (xy_rpc_api.bound) return 0;
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (reg == NULL) return -1;
    xy_rpc_api.add_server = (xy_rpc_add_server_fn)ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server");
    xy_rpc_api.start_server = (xy_rpc_start_server_fn)ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_start_server");
    xy_rpc_api.failure_count = (xy_rpc_failure_count_fn)ggml_backend_reg_get_proc_address(reg, "xybrid_rpc_failure_count");
    xy_rpc_api.last_failure = (xy_rpc_last_failure_fn)ggml_backend_reg_get_proc_address(reg, "xybrid_rpc_last_failure");
    if (xy_rpc_api.add_server == NULL || xy_rpc_api.start_server == NULL) return -1;
    xy_rpc_api.bound = 1;
    return 0;
}

/* A model that uses no RPC server carries this baseline: never checked. */
#define XY_RPC_UNUSED UINT64_MAX
/* What a decode returns when a server of its model was lost meanwhile: its
 * outputs are zero-filled stand-ins, not results. */
#define XY_RC_RPC_LOST (-100)

static inline uint64_t xy_rpc_failures(void) {
    return xy_rpc_api.failure_count != NULL ? xy_rpc_api.failure_count() : 0;
}

/* Has any RPC connection failed since `base` was read? */
static inline int xy_rpc_lost(uint64_t base) {
    return base != XY_RPC_UNUSED && xy_rpc_failures() != base;
}

/* llama_decode, then the check above: every decode of the engine goes
 * through here so that no token is sampled from a lost server's zeros. */
static inline int32_t xy_decode(struct llama_context *ctx, struct llama_batch batch, uint64_t rpc_base) {
    int32_t rc = llama_decode(ctx, batch);
    if (rc == 0 && xy_rpc_lost(rpc_base)) return XY_RC_RPC_LOST;
    return rc;
}

/* --- a CPU device with a memory cap (`xybrid rpc-server --mem`) ------------
 * Clients split layers by the free memory each server reports; the cap makes
 * a server report `cap` bytes (or less, if the machine has less free) while
 * every other call goes to the real device. The wrapper and its context are
 * allocated once per server process and live until it exits. */
typedef struct {
    ggml_backend_dev_t inner;
    size_t cap;
} xy_capped_dev_ctx;

#define XY_INNER(dev) (((xy_capped_dev_ctx *)(dev)->context)->inner)

static const char *xy_capped_name(ggml_backend_dev_t dev) { return XY_INNER(dev)->iface.get_name(XY_INNER(dev)); }
static const char *xy_capped_description(ggml_backend_dev_t dev) { return XY_INNER(dev)->iface.get_description(XY_INNER(dev)); }
static void xy_capped_memory(ggml_backend_dev_t dev, size_t *free_mem, size_t *total) {
    size_t cap = ((xy_capped_dev_ctx *)dev->context)->cap;
    XY_INNER(dev)->iface.get_memory(XY_INNER(dev), free_mem, total);
    if (*total == 0 || *total > cap) *total = cap;
    if (*free_mem == 0 || *free_mem > cap) *free_mem = cap;
}
static enum ggml_backend_dev_type xy_capped_type(ggml_backend_dev_t dev) { return XY_INNER(dev)->iface.get_type(XY_INNER(dev)); }
static void xy_capped_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props *props) {
    XY_INNER(dev)->iface.get_props(XY_INNER(dev), props);
    xy_capped_memory(dev, &props->memory_free, &props->memory_total);
}
static ggml_backend_t xy_capped_init(ggml_backend_dev_t dev, const char *params) {
    ggml_backend_t backend = XY_INNER(dev)->iface.init_backend(XY_INNER(dev), params);
    /* The RPC server asks a backend's device for its memory: point it here. */
    if (backend != NULL) backend->device = dev;
    return backend;
}
static ggml_backend_buffer_type_t xy_capped_buft(ggml_backend_dev_t dev) { return XY_INNER(dev)->iface.get_buffer_type(XY_INNER(dev)); }
static ggml_backend_buffer_type_t xy_capped_host_buft(ggml_backend_dev_t dev) { return XY_INNER(dev)->iface.get_host_buffer_type(XY_INNER(dev)); }
static ggml_backend_buffer_t xy_capped_from_ptr(ggml_backend_dev_t dev, void *ptr, size_t size, size_t max_tensor_size) {
    return XY_INNER(dev)->iface.buffer_from_host_ptr(XY_INNER(dev), ptr, size, max_tensor_size);
}
static bool xy_capped_supports_op(ggml_backend_dev_t dev, const struct ggml_tensor *op) { return XY_INNER(dev)->iface.supports_op(XY_INNER(dev), op); }
static bool xy_capped_supports_buft(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft) { return XY_INNER(dev)->iface.supports_buft(XY_INNER(dev), buft); }
static bool xy_capped_offload_op(ggml_backend_dev_t dev, const struct ggml_tensor *op) { return XY_INNER(dev)->iface.offload_op(XY_INNER(dev), op); }
static ggml_backend_event_t xy_capped_event_new(ggml_backend_dev_t dev) { return XY_INNER(dev)->iface.event_new(XY_INNER(dev)); }
static void xy_capped_event_free(ggml_backend_dev_t dev, ggml_backend_event_t ev) { XY_INNER(dev)->iface.event_free(XY_INNER(dev), ev); }
static void xy_capped_event_sync(ggml_backend_dev_t dev, ggml_backend_event_t ev) { XY_INNER(dev)->iface.event_synchronize(XY_INNER(dev), ev); }

/* A device that is `inner` but for its memory, capped at `cap` bytes; NULL
 * when out of memory. Optional members stay NULL where inner's are. */
static ggml_backend_dev_t xy_capped_device(ggml_backend_dev_t inner, size_t cap) {
    xy_capped_dev_ctx *ctx = (xy_capped_dev_ctx *)malloc(sizeof(*ctx));
    struct ggml_backend_device *dev = (struct ggml_backend_device *)malloc(sizeof(*dev));
    if (ctx == NULL || dev == NULL) {
        free(ctx);
        free(dev);
        return NULL;
    }
    const struct ggml_backend_device_i *in = &inner->iface;
    ctx->inner = inner;
    ctx->cap = cap;
    memset(dev, 0, sizeof(*dev));
    dev->iface.get_name = xy_capped_name;
    dev->iface.get_description = xy_capped_description;
    dev->iface.get_memory = xy_capped_memory;
    dev->iface.get_type = xy_capped_type;
    dev->iface.get_props = xy_capped_props;
    dev->iface.init_backend = xy_capped_init;
    dev->iface.get_buffer_type = xy_capped_buft;
    dev->iface.get_host_buffer_type = in->get_host_buffer_type ? xy_capped_host_buft : NULL;
    dev->iface.buffer_from_host_ptr = in->buffer_from_host_ptr ? xy_capped_from_ptr : NULL;
    dev->iface.supports_op = xy_capped_supports_op;
    dev->iface.supports_buft = xy_capped_supports_buft;
    dev->iface.offload_op = in->offload_op ? xy_capped_offload_op : NULL;
    dev->iface.event_new = in->event_new ? xy_capped_event_new : NULL;
    dev->iface.event_free = in->event_free ? xy_capped_event_free : NULL;
    dev->iface.event_synchronize = in->event_synchronize ? xy_capped_event_sync : NULL;
    dev->reg = inner->reg;   /* so the server finds the CPU backend's set_n_threads */
    dev->context = ctx;
    return dev;
}
