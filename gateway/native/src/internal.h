/* Declarations shared by the gateway's C files; never seen by cffi. */
#ifndef GW_INTERNAL_H
#define GW_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <modsecurity/modsecurity.h>
#include <modsecurity/rules_set.h>
#include <modsecurity/transaction.h>

#include "gw.h"
#include "llhttp.h"

#define GW_MAX_BACKEND_ADDRS 64
#define GW_IDLE_POOL 32          /* idle upstream connections kept per backend address per loop */
#define GW_OUT_HIGH (256 * 1024) /* client output above this: stop reading the upstream */
#define GW_READ_CHUNK 16384

void gw_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- byte buffers: the engine's (native/src/util.c is compiled into this extension too) ---- */
#include "../../../native/src/internal.h"
static inline void abuf_clear(abuf *b) { b->off = b->len = 0; }

/* ---- WAF (waf.c) ---- */
struct gw_waf {
    RulesSet *rules;
    atomic_int refs;
};
gw_waf *waf_retain(gw_waf *w);
Transaction *waf_begin(gw_waf *w, gw_verdict *v, const char *id, const char *cip, int cport, const char *sip,
                       int sport, const char *method, const char *uri, const char *version);
void waf_header(Transaction *tx, const char *name, size_t nlen, const char *value, size_t vlen);
int waf_headers_done(Transaction *tx, gw_verdict *v);   /* 1: intervention (v->status) */
void waf_body(Transaction *tx, const char *data, size_t len);
int waf_body_done(Transaction *tx, gw_verdict *v);      /* 1: intervention */
void waf_end(Transaction *tx);

/* ---- TLS (tls.c) ---- */
struct gw_tls {
    SSL_CTX *ctx;            /* default certificate; its servername callback picks the others */
    int ncerts;
    char **hosts;
    SSL_CTX **ctxs;
    atomic_int refs;
};
gw_tls *tls_retain(gw_tls *t);

/* ---- config (config.c) ---- */
typedef struct gw_backend {
    int provider;            /* >= 0: an external backend (connections from Python), naddrs is 0 */
    int naddrs;
    struct sockaddr_storage addrs[GW_MAX_BACKEND_ADDRS];
    socklen_t addrlens[GW_MAX_BACKEND_ADDRS];
} gw_backend;

typedef struct gw_header_match {
    char *name;
    char *value;
} gw_header_match;

typedef struct gw_route {
    int listener_id;
    char *hostname;
    int path_exact;
    char *path;
    size_t path_len;
    int nheaders;
    gw_header_match *headers;
    char *method;
    int backend;
    gw_waf *waf;
    int waf_mode;
    size_t max_body;
    int stat_slot;
    char *name;
} gw_route;

typedef struct gw_listener_cfg {
    int listener_id;
    gw_tls *tls;
} gw_listener_cfg;

struct gw_config {
    atomic_int refs;
    int nlisteners, nbackends, nroutes;
    gw_listener_cfg *listeners;
    gw_backend *backends;
    gw_route *routes;
};
gw_config *config_retain(gw_config *c);
gw_tls *config_listener_tls(const gw_config *c, int listener_id, int *found);
/* The first route whose listener, host, path and headers match; NULL when none. Header lookups go
 * through `header` (name lower case) so the caller keeps its own storage. */
typedef const char *(*gw_header_lookup)(void *ctx, const char *name, size_t *vlen);
const gw_route *config_match(const gw_config *c, int listener_id, const char *method, const char *host,
                             size_t host_len, const char *path, size_t path_len, gw_header_lookup header,
                             void *ctx);

/* ---- the gateway and its loops (loop.c, http1.c) ---- */
enum {
    GW_C_CONNS_ACCEPTED, GW_C_CONNS_ACTIVE, GW_C_CONNS_REFUSED, GW_C_TLS_HANDSHAKES, GW_C_TLS_ERRORS,
    GW_C_REQUESTS, GW_C_RESPONSES, GW_C_BAD_REQUESTS, GW_C_HEADERS_TOO_LARGE, GW_C_BODY_TOO_LARGE,
    GW_C_TIMEOUTS, GW_C_NO_ROUTE, GW_C_UPSTREAM_CONNECTS, GW_C_UPSTREAM_REUSED, GW_C_UPSTREAM_ERRORS,
    GW_C_UPSTREAM_TIMEOUTS, GW_C_WAF_BLOCKED, GW_C_WAF_DETECTED, GW_C_WAF_ERRORS, GW_C_EVENTS_DROPPED,
    GW_C_BYTES_IN, GW_C_BYTES_OUT, GW_C_COUNT
};

struct gw;
typedef struct gw_loop gw_loop;

struct gw {
    int nloops;
    gw_loop *loops;
    gw_limits limits;
    pthread_mutex_t cfg_lock;
    gw_config *cfg;
    int nlisteners;
    int listen_fds[64];
    int listener_ids[64];
    int started;
    atomic_int stopping;
    int evfd;
    pthread_mutex_t ev_lock;
    gw_event *events;        /* ring of ev_cap */
    size_t ev_cap, ev_head, ev_count;
    atomic_uint_fast64_t counters[GW_C_COUNT];
    atomic_uint_fast64_t route_stats[GW_MAX_ROUTE_SLOTS][GW_ACTION_COUNT];
    atomic_int conns;
    atomic_uint next_loop;   /* round robin of accepted connections over the loops */
};

static inline void gw_count(struct gw *g, int c, uint64_t n) { atomic_fetch_add(&g->counters[c], n); }
gw_config *gw_current_config(struct gw *g);   /* a reference the caller releases */
void gw_emit(struct gw *g, const gw_event *ev);
uint64_t gw_now_ms(void);

/* epoll registrations point at one of these; `kind` tells which object it is. */
enum { EP_LISTENER = 1, EP_CLIENT, EP_UPSTREAM, EP_WAKE };
typedef struct ep_item {
    int kind;
} ep_item;

typedef struct gw_listener_ep {
    ep_item ep;
    int fd;
    int listener_id;
} gw_listener_ep;

typedef struct gw_conn gw_conn;
typedef struct gw_upstream gw_upstream;

typedef struct gw_ready {
    uint64_t token;          /* 0: a client connection accepted by another loop, for listener_id */
    int fd;
    int listener_id;
    struct gw_ready *next;
} gw_ready;

struct gw_loop {
    struct gw *g;
    pthread_mutex_t ready_lock;
    gw_ready *ready;         /* upstream fds handed in by Python, for this loop's requests */
    uint64_t next_token;
    int index;
    int epfd;
    int wakefd;
    ep_item wake_ep;
    pthread_t thread;
    gw_listener_ep *listeners;
    gw_conn *conns;          /* every client connection of this loop (deadline scan) */
    gw_upstream *idle;       /* idle upstream connections, newest first, at most GW_IDLE_POOL per address */
    int nidle;
    uint64_t rng;
    unsigned rr;
};

void http1_accept(gw_loop *l, int fd, int listener_id, const struct sockaddr_storage *peer);
void http1_client_event(gw_conn *c, uint32_t events);
void http1_upstream_event(gw_upstream *u, uint32_t events);
void http1_tick(gw_loop *l, uint64_t now);
void http1_close_all(gw_loop *l);
void http1_reap(void);
void http1_upstream_ready(gw_loop *l, uint64_t token, int fd);

#endif
