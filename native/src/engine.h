/* The C engine's public surface: everything Python calls is declared here, and build_engine.py hands this
 * file (preprocessor lines stripped) to cffi as its cdef: keep it plain declarations. */
#ifndef AMBIT_ENGINE_H
#define AMBIT_ENGINE_H

#include <stddef.h>
#include <stdint.h>

/* Name and version of the crypto module the engine is linked against (reported for FIPS audits). */
const char *ambit_crypto_version(void);
/* 1 when the first certificate of `pem` may act as a CA (CA:true or keyCertSign), 0 for an end entity,
 * -1 when it does not parse. The check every handshake applies to the peer's leaf, for reuse elsewhere. */
int ambit_cert_is_ca(const char *pem, size_t len);

enum ambit_event_kind {
    AMBIT_EV_HANDSHAKE_DONE = 1,
    AMBIT_EV_CONN_ERROR,
    AMBIT_EV_CONN_CLOSED,
    AMBIT_EV_PEER_VERIFIED,
    AMBIT_EV_STREAM_REQUEST,
    AMBIT_EV_STREAM_OPEN,
    AMBIT_EV_STREAM_REFUSED,
    AMBIT_EV_STREAM_CLOSED,
    AMBIT_EV_SPLICE_CLOSED,
    AMBIT_EV_PEER_GOAWAY,    /* client: the peer sent a graceful GOAWAY (status = its last stream id) */
    AMBIT_EV_FAST_OPEN,      /* fast path opened a stream (see fastpath section below) */
    AMBIT_EV_FAST_MISS,      /* fast path handed an accepted socket to Python (status = its fd) */
    AMBIT_EV_UPSTREAM_FAILED, /* accept_connect: the connect failed (status = errno, detail); 503 follows */
    AMBIT_EV_STREAM_ACCEPTED, /* accept_connect: connected, 200 sent, the stream pumps */
    AMBIT_EV_FAST_ACCEPT,    /* inbound fast path accepted a served stream (see the inbound section below) */
};

/* One event handed to Python; fixed size so a batch is one copy out of the queue. */
typedef struct ambit_event {
    int kind;
    uint64_t conn_id;
    uint64_t stream_id;
    uint64_t tag;
    char authority[256];
    char forwarded[256];     /* stream_request: the `forwarded` request header ("" when absent) */
    char baggage[512];       /* stream_request: the peer's `baggage` header ("" when absent or too long) */
    char traceparent[64];    /* stream_request: the peer's `traceparent` header (W3C, "" when absent) */
    char peer_id[512];
    char tls_version[16];
    char tls_cipher[64];
    char peer_cert_sha256[65];
    int status;
    uint64_t bytes_in;
    uint64_t bytes_out;
    char detail[256];
} ambit_event;

/* Engine-wide counters, indexed by this enum; names in ambit_counter_name(). */
enum ambit_counter {
    AMBIT_C_CONNS_OPENED,
    AMBIT_C_CONNS_CLOSED,
    AMBIT_C_CONNS_ACTIVE,
    AMBIT_C_HANDSHAKES_DONE,
    AMBIT_C_HANDSHAKES_RESUMED,
    AMBIT_C_STREAMS_OPENED,
    AMBIT_C_STREAMS_CLOSED,
    AMBIT_C_STREAMS_ACTIVE,
    AMBIT_C_STREAMS_REFUSED,
    AMBIT_C_STREAMS_RESET,
    AMBIT_C_STREAM_BYTES_IN,
    AMBIT_C_STREAM_BYTES_OUT,
    AMBIT_C_TLS_BYTES_IN,
    AMBIT_C_TLS_BYTES_OUT,
    AMBIT_C_SPLICES_OPENED,
    AMBIT_C_SPLICES_CLOSED,
    AMBIT_C_SPLICES_ACTIVE,
    AMBIT_C_SPLICE_BYTES,
    AMBIT_C_ERRORS_HANDSHAKE,
    AMBIT_C_ERRORS_PEER_IDENTITY,
    AMBIT_C_ERRORS_PROTOCOL,
    AMBIT_C_ERRORS_IO,
    AMBIT_C_ERRORS_COMMAND,
    AMBIT_C_EVENTS_DROPPED,
    AMBIT_C_RESETS_LINGERED,
    AMBIT_C_STREAMS_RESET_EARLY,
    AMBIT_C_REFUSED_HANDSHAKES,    /* pending-handshake caps (engine-wide, per source) */
    AMBIT_C_REFUSED_CONNS_SOURCE,  /* connections per source address */
    AMBIT_C_REFUSED_STREAMS_PEER,  /* served streams per peer identity */
    AMBIT_C_REFUSED_STREAMS_CONN,  /* a peer exceeding our SETTINGS_MAX_CONCURRENT_STREAMS */
    AMBIT_C_RESET_FLOODS,          /* connections ended for exceeding the stream reset budget */
    AMBIT_C_MALLOC_TRIMS,
    AMBIT_C_COUNT
};

/* Limits (ambit_engine_set_limit), each refusing only the offending peer's new work; 0 = unlimited. */
enum ambit_limit {
    AMBIT_L_PENDING_HANDSHAKES,  /* server TLS handshakes in progress, engine-wide */
    AMBIT_L_PENDING_PER_SOURCE,  /* ... from one source address */
    AMBIT_L_CONNS_PER_SOURCE,    /* server connections from one source address */
    AMBIT_L_STREAMS_PER_PEER,    /* served streams of one authenticated peer identity, all connections */
    AMBIT_L_MAX_CONCURRENT_STREAMS, /* SETTINGS_MAX_CONCURRENT_STREAMS we advertise (new connections) */
    AMBIT_L_RESETS_PER_S,        /* stream resets a peer may cause per second on one connection */
    AMBIT_L_STREAM_BUFFER,       /* bytes buffered per stream socket->peer (reading pauses when full) */
    AMBIT_L_CONN_BUFFER,         /* bytes buffered socket->peer over all streams of one connection */
    AMBIT_L_COUNT
};

typedef struct ambit_engine ambit_engine;

const char *ambit_counter_name(int index);
ambit_engine *ambit_engine_new(int threads, char *err, size_t errlen);
int ambit_engine_start(ambit_engine *e, char *err, size_t errlen);
/* Stops the loop threads, closes every connection and fd the engine owns. */
void ambit_engine_stop(ambit_engine *e);
/* Frees the engine (stops it first if needed); closes the event fd. */
void ambit_engine_free(ambit_engine *e);
int ambit_engine_eventfd(ambit_engine *e);
/* Handshake deadline, keepalive PING after idle, and PING answer deadline, in ms (0 disables each). */
void ambit_engine_set_timeouts(ambit_engine *e, int handshake_ms, int keepalive_idle_ms, int keepalive_timeout_ms);
/* Returns 0, or -1 for an unknown limit or a negative value. */
int ambit_engine_set_limit(ambit_engine *e, int which, int value);
/* Server handshakes accept only a client leaf whose single URI SAN is a workload ID (spiffe://TD/ns/NS/sa/SA)
 * of one of these trust domains (newline-separated; "" = none; NULL = no rule): others get a TLS alert. */
int ambit_engine_set_peer_domains(ambit_engine *e, const char *domains);
int ambit_engine_events(ambit_engine *e, ambit_event *out, int max);
void ambit_engine_counters(ambit_engine *e, uint64_t *out, int n);

int64_t ambit_tls_context(ambit_engine *e, int server, const char *chain_pem, size_t chain_len,
                          const char *key_pem, size_t key_len, const char *bundle_pem, size_t bundle_len,
                          int tls12, char *err, size_t errlen);
int ambit_free_tls_context(ambit_engine *e, int64_t ctx);

/* Each returns an id (>0) or -1 with err set; fds passed in belong to the engine from then on, even on error. */
int64_t ambit_connect_hbone(ambit_engine *e, int fd, int64_t ctx, const char *expected_peer, uint64_t tag,
                            char *err, size_t errlen);
/* forwarded: value of the `forwarded` request header (RFC 7239, e.g. "for=10.244.1.2"), NULL or "" for none.
 * extra: more request headers as "name: value\n" lines (e.g. baggage, traceparent), NULL or "" for none;
 * names lowercase [a-z0-9-], at most AMBIT_EXTRA_HEADERS of them, AMBIT_EXTRA_BYTES in all. */
int64_t ambit_open_stream(ambit_engine *e, uint64_t conn_id, const char *authority, const char *forwarded,
                          const char *extra, int local_fd, uint64_t tag, char *err, size_t errlen);
int64_t ambit_serve_hbone(ambit_engine *e, int fd, int64_t ctx, uint64_t tag, char *err, size_t errlen);
int ambit_accept_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, int upstream_fd, uint64_t tag,
                        char *err, size_t errlen);
/* Accept a served stream once the engine's connect to dst_ip:dst_port succeeds (from source_ip with
 * IP_TRANSPARENT when not NULL/"", SO_MARK `mark` when not 0): AMBIT_EV_STREAM_ACCEPTED then, else
 * AMBIT_EV_UPSTREAM_FAILED and a 503 (10 s connect deadline). -1: the socket could not be made (err). */
int ambit_accept_connect(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, const char *dst_ip, int dst_port,
                         const char *source_ip, int mark, uint64_t tag, char *err, size_t errlen);
int ambit_reject_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, int status, char *err,
                        size_t errlen);
int ambit_reset_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, char *err, size_t errlen);
int64_t ambit_splice(ambit_engine *e, int fd_a, int fd_b, uint64_t tag, char *err, size_t errlen);
int ambit_close(ambit_engine *e, uint64_t conn_id, char *err, size_t errlen);

/* Live byte counts and state of streams and splices (`ambit debug connections`), answered by the loop
 * threads that own them: post one query (one command per loop that owns an item), then wait for it. The
 * caller may wait without holding anything the loops need; a query outlives a timeout or engine stop. */
enum ambit_flow_state {
    AMBIT_FLOW_UNKNOWN = 0,  /* no such stream or splice (ended, or never existed) */
    AMBIT_FLOW_CONNECTING,   /* client: CONNECT sent, no 2xx yet; server: announced, not accepted yet */
    AMBIT_FLOW_OPEN,
    AMBIT_FLOW_HALF_CLOSED,  /* one direction ended (EOF / END_STREAM), the other still carries bytes */
    AMBIT_FLOW_CLOSING,      /* both directions ended or reset: the end event follows */
};

typedef struct ambit_flow_stats {
    uint64_t conn_id;    /* in: HBONE connection id (with stream_id) or splice id (stream_id 0) */
    uint64_t stream_id;  /* in: engine stream id, 0 for a splice */
    int state;           /* out: AMBIT_FLOW_* */
    uint64_t bytes_in;   /* out: as in the end event (stream: DATA from the peer; splice: read from fd_a) */
    uint64_t bytes_out;  /* out: stream: DATA sent to the peer; splice: written to fd_a */
} ambit_flow_stats;

typedef struct ambit_flow_query ambit_flow_query;

/* Items per query, at most (callers batch beyond it). */
enum { AMBIT_FLOW_QUERY_MAX = 4096 };
/* A query of n items (1..AMBIT_FLOW_QUERY_MAX), or NULL with err set (engine stopped, bad n, no memory). */
ambit_flow_query *ambit_flow_query_post(ambit_engine *e, const ambit_flow_stats *items, int n, char *err,
                                        size_t errlen);
/* Waits up to timeout_ms for every loop's answer, copies the n items to out and frees the query (the
 * loops drop their part when they answer). Returns the number of items found, or -1 on timeout. */
int ambit_flow_query_wait(ambit_flow_query *q, ambit_flow_stats *out, int n, int timeout_ms);

/* --- Keys and certificate facts for the agent's identity code (native/src/pki.c) ----------------------
 * The engine already links OpenSSL, so the agent needs no second crypto library in its address space. */

/* A fresh P-256 key (PKCS#8 PEM) and a CSR for it: empty subject, SHA-256, and when uri is not NULL one
 * critical SAN with that single URI. Returns 0, or -1 with err set. Both outputs are NUL-terminated and
 * malloc'd: release them with ambit_pki_free (it wipes them first: one is a private key). */
int ambit_pki_key_and_csr(const char *uri, char **key_pem, char **csr_pem, char *err, size_t errlen);
void ambit_pki_free(char *p);

typedef struct ambit_cert_facts {
    int64_t not_before;   /* unix seconds */
    int64_t not_after;
    int uri_count;        /* URI SANs */
    char uri[2048];       /* the first URI SAN, "" when none */
    char serial_hex[130]; /* the serial number in hex */
    char subject[1024];   /* RFC 2253 (truncated when longer) */
    char issuer[1024];
} ambit_cert_facts;

/* Facts of the index-th certificate of a PEM chain. Returns how many certificates the chain holds (more
 * than index), or -1 with err set: no certificate, one that does not parse, index out of range, a
 * duplicated SAN extension, a URI with a NUL byte or longer than uri holds (all refused, never truncated). */
int ambit_pki_cert_facts(const char *pem, size_t len, int index, ambit_cert_facts *out, char *err,
                         size_t errlen);
/* 1 when the last certificate of chain_pem names the first of issuer_pem as its issuer and carries its
 * valid signature, 0 when not, -1 when either does not parse. */
int ambit_pki_last_signed_by(const char *chain_pem, size_t chain_len, const char *issuer_pem, size_t issuer_len);
/* 1 when the first certificate of cert_pem carries the public key of key_pem, 0 when not, -1 when either
 * does not parse. */
int ambit_pki_cert_has_key(const char *cert_pem, size_t cert_len, const char *key_pem, size_t key_len);

/* ---- Outbound fast path (fastpath.c; docs/engine.md "Fast path") ----
 * The engine accepts on the capture listener and opens the CONNECT stream itself for a (source ip,
 * destination ip:port) Python installed; anything else is handed to Python (AMBIT_EV_FAST_MISS, status =
 * the accepted fd, now Python's). A hit emits AMBIT_EV_FAST_OPEN (conn_id, stream_id, tag = the engine's
 * tag for the stream, status = the client's source port, bytes_in = the entry id, traceparent = the one
 * sent, authority) before the stream's own events. */
enum { AMBIT_FAST_MAX_CONNS = 8, AMBIT_FAST_DEFAULT_CAPACITY = 1024 };
enum ambit_fast_counter {
    AMBIT_FAST_C_ACCEPTED,
    AMBIT_FAST_C_HITS,
    AMBIT_FAST_C_MISSES,
    AMBIT_FAST_C_MISSES_NO_ENTRY,
    AMBIT_FAST_C_MISSES_NO_CREDIT,
    AMBIT_FAST_C_MISSES_STALE,     /* the entry predates the last ambit_fastpath_invalidate */
    AMBIT_FAST_C_MISSES_BUSY,
    AMBIT_FAST_C_MISSES_CONN_GONE,
    AMBIT_FAST_C_ACCEPT_ERRORS,
    AMBIT_FAST_C_HANDOFFS_DROPPED,
    AMBIT_FAST_C_ENTRIES,          /* a level: entries installed now */
    AMBIT_FAST_C_COUNT
};
const char *ambit_fastpath_counter_name(int index);
void ambit_fastpath_counters(ambit_engine *e, uint64_t *out, int n);
/* The engine owns `fd` (a listening socket) from the call on, even on error; the engine must be started. */
int ambit_fastpath_listen(ambit_engine *e, int fd, char *err, size_t errlen);
int ambit_fastpath_set_capacity(ambit_engine *e, int capacity);
/* Installs entry `entry_id` (Python's id, unique; `generation` read before the routing decision it
 * encodes, refused when stale) for streams from src_ip to dst_ip:dst_port on one of
 * `conns` (1..AMBIT_FAST_MAX_CONNS pooled client connections; the least busy is taken, and while all carry
 * a stream and nconns < spread it is a miss), at most `credits` of them. authority / extra as
 * ambit_open_stream's (a fresh traceparent is appended to extra per stream); forwarded: the client's IP
 * address (NULL: no header), sent as `forwarded: for="<ip>:<client port>"`. -1: full, exists, bad input. */
/* Every entry installed so far stops opening streams (a new snapshot, policy or credentials); returns the
 * new generation. Callable from any thread without Python's locks. */
uint64_t ambit_fastpath_invalidate(ambit_engine *e);
uint64_t ambit_fastpath_generation(ambit_engine *e);
int ambit_fastpath_put(ambit_engine *e, uint64_t entry_id, uint64_t generation, const char *src_ip, const char *dst_ip, int dst_port,
                       const uint64_t *conns, int nconns, int spread, int credits, const char *authority,
                       const char *forwarded, const char *extra, char *err, size_t errlen);
/* More credits for an installed entry; -1 when there is no such entry (removed meanwhile). */
int ambit_fastpath_add_credits(ambit_engine *e, uint64_t entry_id, int credits);
/* Removes an entry; returns the credits it had left, or -1 when there is no such entry. No stream is
 * opened by it once this returns. */
int ambit_fastpath_remove(ambit_engine *e, uint64_t entry_id);

/* ---- Inbound fast path (fastpath_in.c; docs/engine.md "Inbound fast path") ----
 * A served CONNECT matching an entry (its connection, its raw :authority, the source its `forwarded` claims)
 * is accepted by the engine as ambit_accept_connect would, without a stream_request. Once its connect to the
 * pod ended, AMBIT_EV_FAST_ACCEPT (conn_id, stream_id, tag = the engine's tag for the stream, bytes_in = the
 * entry id, bytes_out = 0 connected and answered 200 (no stream_accepted follows) or 1 failed
 * (upstream_failed follows), status = the port the claim names or 0, traceparent = the request's). */
enum { AMBIT_FASTIN_DEFAULT_CAPACITY = 4096 };
enum ambit_fastin_counter {
    AMBIT_FASTIN_C_HITS,
    AMBIT_FASTIN_C_MISSES,
    AMBIT_FASTIN_C_MISSES_NO_ENTRY,
    AMBIT_FASTIN_C_MISSES_STALE,      /* the entry predates the last ambit_fastin_invalidate */
    AMBIT_FASTIN_C_MISSES_NO_CREDIT,
    AMBIT_FASTIN_C_MISSES_CLAIM,      /* a `forwarded` value outside the strict subset the engine reads */
    AMBIT_FASTIN_C_REFUSED,           /* ambit_fastin_put refused: stale, full, exists */
    AMBIT_FASTIN_C_HANDOFFS_DROPPED,  /* a hit whose event could not be queued: refused 503 instead */
    AMBIT_FASTIN_C_ENTRIES,           /* a level: entries installed now */
    AMBIT_FASTIN_C_COUNT
};
const char *ambit_fastin_counter_name(int index);
void ambit_fastin_counters(ambit_engine *e, uint64_t *out, int n);
int ambit_fastin_set_capacity(ambit_engine *e, int capacity);
/* Every entry installed so far stops matching; the new generation. Any thread, no Python lock needed. */
uint64_t ambit_fastin_invalidate(ambit_engine *e);
uint64_t ambit_fastin_generation(ambit_engine *e);
/* Installs entry `entry_id` (unique; `generation` read before the decision it encodes, refused when
 * stale): up to `credits` streams on served connection `conn_id` whose :authority is exactly `authority`
 * and whose `forwarded` claims `claim_ip` ("" = no header; an IPv4 address otherwise) are connected to
 * dst_ip:dst_port from source_ip (NULL: not spoofed) with SO_MARK `mark`. -1: stale, full, exists, bad. */
int ambit_fastin_put(ambit_engine *e, uint64_t entry_id, uint64_t generation, uint64_t conn_id,
                     const char *authority, const char *claim_ip, const char *dst_ip, int dst_port,
                     const char *source_ip, int mark, int credits, char *err, size_t errlen);
int ambit_fastin_add_credits(ambit_engine *e, uint64_t entry_id, int credits);
/* The credits it had left, or -1 when there is no such entry; it matches no stream once this returns. */
int ambit_fastin_remove(ambit_engine *e, uint64_t entry_id);

#endif
