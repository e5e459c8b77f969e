"""Builds the C engine as the cffi extension `native._engine` (out-of-line API mode).

Run by `make native`; the compiled module lands beside this file so the in-tree package imports it.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "src"

# Only the declarations Python may call: keep this the single C surface the package sees (mirrors engine.h).
CDEF = """
const char *ambit_crypto_version(void);

typedef struct ambit_event {
    int kind;
    uint64_t conn_id;
    uint64_t stream_id;
    uint64_t tag;
    char authority[256];
    char peer_id[512];
    char tls_version[16];
    char tls_cipher[64];
    char peer_cert_sha256[65];
    int status;
    uint64_t bytes_in;
    uint64_t bytes_out;
    char detail[256];
} ambit_event;

#define AMBIT_C_COUNT ...

typedef struct ambit_engine ambit_engine;

const char *ambit_counter_name(int index);
ambit_engine *ambit_engine_new(int threads, char *err, size_t errlen);
int ambit_engine_start(ambit_engine *e, char *err, size_t errlen);
void ambit_engine_stop(ambit_engine *e);
void ambit_engine_free(ambit_engine *e);
int ambit_engine_eventfd(ambit_engine *e);
void ambit_engine_set_timeouts(ambit_engine *e, int handshake_ms, int keepalive_idle_ms,
                               int keepalive_timeout_ms);
int ambit_engine_events(ambit_engine *e, ambit_event *out, int max);
void ambit_engine_counters(ambit_engine *e, uint64_t *out, int n);
int64_t ambit_tls_context(ambit_engine *e, int server, const char *chain_pem, size_t chain_len,
                          const char *key_pem, size_t key_len, const char *bundle_pem, size_t bundle_len,
                          int tls12, char *err, size_t errlen);
int ambit_free_tls_context(ambit_engine *e, int64_t ctx);
int64_t ambit_connect_hbone(ambit_engine *e, int fd, int64_t ctx, const char *expected_peer, uint64_t tag,
                            char *err, size_t errlen);
int64_t ambit_open_stream(ambit_engine *e, uint64_t conn_id, const char *authority, int local_fd,
                          uint64_t tag,
                          char *err, size_t errlen);
int64_t ambit_serve_hbone(ambit_engine *e, int fd, int64_t ctx, uint64_t tag, char *err, size_t errlen);
int ambit_accept_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, int upstream_fd, uint64_t tag,
                        char *err, size_t errlen);
int ambit_reject_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, int status, char *err,
                        size_t errlen);
int ambit_reset_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, char *err, size_t errlen);
int64_t ambit_splice(ambit_engine *e, int fd_a, int fd_b, uint64_t tag, char *err, size_t errlen);
int ambit_close(ambit_engine *e, uint64_t conn_id, char *err, size_t errlen);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "native._engine",
    '#include "engine.h"',
    sources=[str(p.relative_to(ROOT)) for p in sorted(SRC.glob("*.c"))],
    include_dirs=[str(SRC)],
    libraries=["ssl", "crypto", "nghttp2", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT), verbose=False)
