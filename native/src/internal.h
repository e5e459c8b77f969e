/* Shared internals of the engine: loops, objects, buffers. Only the loop thread that owns an object
 * touches it; Python threads talk to a loop through its command queue. */
#ifndef AMBIT_INTERNAL_H
#define AMBIT_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <stddef.h>

#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

#include "engine.h"

#define AMBIT_READ_CHUNK (256 * 1024)       /* one TLS read / socket read batch */
#define AMBIT_WBUF_HIGH (256 * 1024)        /* pending TLS plaintext before we stop asking nghttp2 */
#define AMBIT_STREAM_INBUF (128 * 1024)     /* TCP->h2 bytes buffered per stream (backpressure point) */
#define AMBIT_MAX_FRAME (128 * 1024)       /* largest DATA frame we send (less if the peer allows less) */
#define AMBIT_ACCEPT_FRAME (1024 * 1024)   /* largest frame we accept (SETTINGS_MAX_FRAME_SIZE; ztunnel: 1 MiB) */
#define AMBIT_STREAM_INBUF_MAX (1024 * 1024) /* ceiling for AMBIT_L_STREAM_BUFFER */
#define AMBIT_CONN_INBUF (4 * 1024 * 1024)   /* default AMBIT_L_CONN_BUFFER */
#define AMBIT_DEFAULT_MAX_STREAMS 200        /* SETTINGS_MAX_CONCURRENT_STREAMS advertised (ztunnel-like) */
#define AMBIT_STREAM_WINDOW (4 * 1024 * 1024)
#define AMBIT_CONN_WINDOW (16 * 1024 * 1024)
#define AMBIT_PIPE_SIZE (256 * 1024)
#define AMBIT_TLS_WBUF (256 * 1024)         /* TLS records coalesced per send() */
#define AMBIT_TICK_MS 200
#define AMBIT_HEADER_MAX 256          /* longest :authority / forwarded value kept (with NUL) */
#define AMBIT_EXTRA_HEADERS 8         /* extra request headers per CONNECT (open_stream) */
#define AMBIT_EXTRA_BYTES 2048        /* their total size */
#define AMBIT_LINGER_MS 2000          /* longest a reset socket waits without progress to transmit its bytes */

/* Growable byte buffer with a consumed prefix. */
typedef struct abuf {
    char *data;
    size_t off, len, cap;
} abuf;

int abuf_reserve(abuf *b, size_t extra);
int abuf_append(abuf *b, const void *p, size_t n);
void abuf_consume(abuf *b, size_t n);
void abuf_free(abuf *b);
static inline size_t abuf_pending(const abuf *b) { return b->len - b->off; }
static inline char *abuf_head(const abuf *b) { return b->data + b->off; }

/* uint64 -> pointer map (chained). */
typedef struct amap_entry {
    uint64_t key;
    void *value;
    struct amap_entry *next;
} amap_entry;
typedef struct amap {
    amap_entry **slots;
    size_t nslots, count;
} amap;
int amap_put(amap *m, uint64_t key, void *value);
void *amap_get(const amap *m, uint64_t key);
void *amap_del(amap *m, uint64_t key);
void *amap_any(const amap *m);
void amap_each(const amap *m, void (*fn)(void *value, void *arg), void *arg);
void amap_free(amap *m);

/* Every fd registered in epoll carries one of these; the callback gets the epoll event mask. */
struct ambit_loop;
typedef struct aio {
    int fd;
    void (*on_event)(struct ambit_loop *loop, struct aio *io, uint32_t events);
    void *owner;
} aio;

enum cmd_kind {
    CMD_CONNECT, CMD_SERVE, CMD_OPEN_STREAM, CMD_ACCEPT, CMD_REJECT, CMD_RESET, CMD_SPLICE, CMD_CLOSE,
    CMD_FAST_OPEN, CMD_ACCEPT_CONNECT, CMD_FLOW_STATS,
};

typedef struct acmd {
    int kind;
    uint64_t id;     /* conn / splice id */
    uint64_t id2;    /* stream id */
    int fd, fd2;
    int status;
    uint64_t tag;
    SSL_CTX *ctx;    /* one reference owned by the command */
    char *text;      /* expected peer / authority (malloc'd) */
    char *text2;     /* forwarded header value (malloc'd) or NULL */
    char *text3;     /* extra request headers, "name: value\n" lines (malloc'd) or NULL */
    uint64_t aux;    /* CMD_FAST_OPEN: the fast path entry id */
    int fd_registered; /* CMD_ACCEPT from upstream.c: fd is in this loop's epoll already (MOD, not ADD) */
    ambit_flow_query *query; /* CMD_FLOW_STATS: this loop's share of a query (flows.c) */
    struct acmd *next;
} acmd;

struct hconn;
struct hstream;

typedef struct ambit_loop {
    struct ambit_engine *engine;
    int index;
    int epfd;
    int wakefd;              /* eventfd: commands pending */
    aio wake_io;
    int timerfd;             /* periodic tick: handshake deadlines and keepalive */
    aio timer_io;
    pthread_t thread;
    int running;
    pthread_mutex_t cmd_lock;
    acmd *cmd_head, *cmd_tail;
    amap conns;              /* conn id -> hconn */
    amap splices;            /* splice id -> apump */
    amap streams;            /* stream id -> hstream */
    struct hstream *ready;   /* streams whose TCP side needs pumping */
    struct hconn *dirty;     /* connections with output to flush or state to check */
    struct apump *pumps_done; /* splices to free once the current epoll batch is handled */
    struct alinger *lingers; /* reset sockets still transmitting their queued bytes (linger.c) */
    struct upconn *upconns;  /* connects to pods of streams accepted once connected (upstream.c) */
    int upconns_tick_due;    /* the tick ran: expire connects after the epoll batch (upstream.c) */
    char *rbuf;              /* shared read buffer, AMBIT_READ_CHUNK */
} ambit_loop;

typedef struct tls_ctx_entry {
    int64_t id;
    SSL_CTX *ctx;
    struct tls_ctx_entry *next;
} tls_ctx_entry;

struct ambit_engine {
    int nloops;
    ambit_loop *loops;
    int started, stopped;
    int evfd;
    pthread_mutex_t ev_lock;
    ambit_event *evq;
    size_t ev_head, ev_count, ev_cap;
    int ev_woken;            /* under ev_lock: Python was woken for the queued events (until it drains) */
    uint64_t ev_lazy_since;  /* under ev_lock: when the oldest unwoken (informational) event was queued */
    pthread_mutex_t ctx_lock;
    tls_ctx_entry *ctxs;
    uint64_t next_id;        /* atomic: connection and splice ids (one space: close() takes either) */
    uint64_t next_stream_id; /* atomic: streams, always named together with their connection */
    uint64_t next_ctx_id;    /* atomic: TLS contexts */
    int handshake_timeout_ms; /* atomic; 0 disables */
    int keepalive_idle_ms;    /* atomic; PING after this much silence, 0 disables */
    int keepalive_timeout_ms; /* atomic; no answer to the PING within this ends the connection */
    uint64_t counters[AMBIT_C_COUNT];
    int limits[AMBIT_L_COUNT];   /* atomic */
    pthread_mutex_t limits_lock; /* guards shares and pending_handshakes */
    amap shares;                 /* source / peer key -> share (limits.c) */
    uint32_t pending_handshakes;
    uint64_t closed_at_trim;     /* connections, streams and splices closed at the last malloc_trim */
    uint64_t last_trim_ms;       /* the trim's state is loop 0's alone (maybe_trim) */
    int trim_settling;           /* trims left after a burst (or start-up) while closes trickle on */
    int trim_drained;            /* the event queue was empty at the last trim */
    uint64_t trim_not_before_ms; /* start-up: the first trim waits for the host's start-up to end */
    struct fastpath *fast;       /* outbound fast path (fastpath.c), made on first use */
    struct fastin *fast_in;      /* inbound fast path (fastpath_in.c), made on first use */
    char *peer_domains;          /* "\nTD\n...\n" or NULL (ambit_engine_set_peer_domains), under limits_lock */
};

/* A handshake's verdict on the peer's leaf, made in the verify callback (so a refusal is a TLS alert):
 * `why` empty while accepted; `presented` the leaf's URI SAN (server). Hung on the SSL (tls_verdict_attach). */
typedef struct tls_verdict {
    ambit_engine *engine;
    int server;                  /* the client-identity rules apply */
    int alert_sent;              /* OpenSSL wrote a TLS alert (info callback): close without a reset */
    const char *why;             /* a static string, NULL while accepted */
    char *presented;             /* the connection's peer_id buffer */
    size_t presented_cap;
} tls_verdict;

/* Counters are bumped with relaxed atomics from any loop and read from Python. */
static inline void ctr_add(ambit_engine *e, int c, int64_t v)
{
    __atomic_add_fetch(&e->counters[c], (uint64_t)v, __ATOMIC_RELAXED);
}
/* Ids come from per-kind counters, so connections spread evenly over loops (id % loops). */
uint64_t engine_new_id(uint64_t *counter);

/* Event construction: a zeroed event with kind/ids set; emit copies it into the queue. */
void event_init(ambit_event *ev, int kind, uint64_t conn_id, uint64_t stream_id, uint64_t tag);
/* 0, or -1 when the queue is at its bound and the event was dropped (counted). */
int event_emit(ambit_engine *e, const ambit_event *ev);
void copy_str(char *dst, size_t cap, const char *src);

int loop_add_fd(ambit_loop *l, aio *io, int fd);
/* An fd already in the loop's epoll changes hands: its events go to io from now on (one MOD, no DEL+ADD). */
int loop_move_fd(ambit_loop *l, aio *io, int fd);
void loop_del_fd(ambit_loop *l, aio *io);
void reset_close(int fd);
void set_nodelay(int fd);
int set_nonblock(int fd);
int rand_take(unsigned char *out, size_t n);

/* tls.c */
SSL_CTX *tls_ctx_build(int server, const char *chain, size_t chain_len, const char *key, size_t key_len,
                       const char *bundle, size_t bundle_len, int tls12, char *err, size_t errlen);
/* Fills peer_id (the single URI SAN or ""), sha256 hex, version, cipher from an established SSL. */
void tls_peer_info(SSL *ssl, ambit_event *ev);
void tls_client_session_prepare(SSL *ssl, SSL_CTX *ctx, const char *peer);
void tls_last_error(char *buf, size_t cap, const char *what);
void tls_verdict_attach(SSL *ssl, tls_verdict *v);

/* hbone.c */
void hconn_start(ambit_loop *l, acmd *c, int server);
void hconn_open_stream(ambit_loop *l, acmd *c);
void hconn_accept(ambit_loop *l, acmd *c);
void hconn_reject(ambit_loop *l, acmd *c);
void hconn_reset(ambit_loop *l, acmd *c);
int hconn_close_cmd(ambit_loop *l, uint64_t id);
void hconn_process_pending(ambit_loop *l);
void hconn_destroy_all(ambit_loop *l);
void hconn_tick(ambit_loop *l);
uint64_t now_ms(void);

/* linger.c: reset fd once the bytes in `out` (taken over) and the kernel's queue are transmitted. */
void linger_reset(ambit_loop *l, int fd, abuf *out);
/* ... or, for a stream that ended cleanly, close it normally (FIN) once `out` is written. */
void linger_close(ambit_loop *l, int fd, abuf *out);
/* ... or, after a TLS alert: FIN, then read and discard until the peer closes (bounded), then close. */
void linger_drain(ambit_loop *l, int fd);
void linger_tick(ambit_loop *l);
void linger_reap(ambit_loop *l, int all);

/* limits.c: keys, then start/end accounting; conn_start returns NULL or why it is refused. */
uint64_t limits_source_key(int fd);
uint64_t limits_peer_key(const char *peer_id);
const char *limits_conn_start(ambit_engine *e, uint64_t src);
void limits_handshake_over(ambit_engine *e, uint64_t src);
void limits_conn_end(ambit_engine *e, uint64_t src, int pending);
int limits_stream_start(ambit_engine *e, uint64_t peer);
void limits_stream_end(ambit_engine *e, uint64_t peer);
/* An authenticated connection of `peer` starts (+1) or ends (-1): its share (and reset window) lives while
 * it has connections or streams. */
void limits_peer_conn(ambit_engine *e, uint64_t peer, int delta);
/* Counts one stream reset caused by `peer`; 1 when that exceeds its AMBIT_L_RESETS_PER_S budget. */
int limits_reset(ambit_engine *e, uint64_t peer, uint64_t now);
void limits_free(ambit_engine *e);

/* fastpath.c */
#define AMBIT_FAST_TAG_BIT (1ULL << 62) /* tags of fast path streams (Python's own stay below) */
/* A fast path table (its first member a pthread_mutex_t) made on first use by whichever thread comes first:
 * `size` bytes zeroed, the lock initialised, then `init`; NULL when out of memory. */
void *fast_table_of(void **slot, size_t size, void (*init)(void *table));
/* Under the table's lock: its hash slots, made on the first put (0 when out of memory); why a put is
 * refused (NULL: it is not), the same checks in the same order for both tables. */
int fast_slots_ready(void **slots, size_t *nslots);
const char *fast_put_refused(int ready, int stale, int full, int exists);
void loop_post_cmd(ambit_engine *e, uint64_t id, acmd *c); /* to the loop owning id */
void fastpath_run_open(ambit_loop *l, acmd *c);
void fastpath_stream_done(ambit_engine *e, uint64_t conn_id);
void fastpath_tick(ambit_loop *l);
void fastpath_free(ambit_engine *e);
/* fastpath_in.c: 1 when an entry accepted this announced served stream (its events are emitted), 0 when
 * it is Python's (stream_request). fastin_free: with the engine (fastpath_free calls it). */
#define AMBIT_FASTIN_TAG_BIT (1ULL << 61)
int fastin_try(ambit_loop *l, uint64_t conn_id, uint64_t stream_id, const char *authority, const char *forwarded,
               int forwarded_bad, const char *traceparent);
void fastin_free(ambit_engine *e);
/* A hit whose event could not be queued: the entry (when still installed) gets its credit back, counted. */
void fastin_unseen(ambit_engine *e, uint64_t entry_id);
/* hbone.c: whether a client connection still takes new streams (on its loop). */
int hconn_client_usable(ambit_loop *l, uint64_t id);

/* upstream.c; accept_connect_fast: for the inbound fast path, whose one event (AMBIT_EV_FAST_ACCEPT, from
 * `fa`) is emitted once the connect ended, in place of stream_accepted. */
typedef struct fast_accept {
    uint64_t entry;         /* the fastpath_in entry that accepted the stream */
    int port;               /* the source port its `forwarded` named, 0 when none */
    char traceparent[64];   /* the request's, as stream_request would report it */
} fast_accept;
void accept_connect_start(ambit_loop *l, acmd *c);
void accept_connect_fast(ambit_loop *l, acmd *c, const fast_accept *fa);
void accept_connect_tick(ambit_loop *l);
void accept_connect_destroy_all(ambit_loop *l);

/* flows.c: a loop answers its items of a flow query; a query command dropped unrun (engine stopped)
 * gives up its share. hconn/pump fill one item they own (1 found, 0 unknown). */
void flows_answer(ambit_loop *l, ambit_flow_query *q);
void flows_abandon(ambit_flow_query *q);
int hconn_flow_stats(ambit_loop *l, ambit_flow_stats *item);
int pump_flow_stats(ambit_loop *l, ambit_flow_stats *item);
acmd *cmd_new(int kind);
void loop_post(ambit_loop *l, acmd *c);

/* pump.c */
void pump_start(ambit_loop *l, acmd *c);
int pump_close_cmd(ambit_loop *l, uint64_t id);
void pump_process_pending(ambit_loop *l);
void pump_destroy_all(ambit_loop *l);

#endif
