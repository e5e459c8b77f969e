/* The outbound fast path: the engine accepts on the capture listener (15001) itself and, for a connection
 * whose (source ip, destination ip:port) Python pre-authorized in this table, opens the CONNECT stream on
 * one of the entry's pooled connections without a Python call. Everything else (no entry, an entry out of
 * credits, every connection of it busy while the key may spread, a connection that stopped taking
 * streams) is handed to Python with the accepted fd: a miss is never a passthrough.
 *
 * Python stays the decider: it installs an entry only after routing a connection of that (source,
 * destination) itself, removes it on every snapshot, credential or pool change, and sees every fast
 * connection in its events (AMBIT_EV_FAST_OPEN first, then the stream's usual events but stream_open:
 * Python records a fast stream as up from its fast_open).
 * Credits bound what an entry may open before Python looks again (Python reserves one unit of the
 * source's connection budget per credit), and the table holds at most `capacity` entries. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "internal.h"

#define FAST_ACCEPT_BATCH 64    /* accepts per readiness event: the listener cannot starve loop 0 */
#define FAST_PAUSE_MS 100       /* listener pause after EMFILE and friends (as the Python acceptor) */
#define FAST_TP_LINE 80 /* "traceparent: " + "00-" 32 hex "-" 16 hex "-00" + "\n" (70 with the NUL) */

typedef struct fkey {
    uint8_t family;
    uint8_t src[16], dst[16];
    uint16_t port;
} fkey;

typedef struct fentry {
    uint64_t id;
    fkey key;
    uint64_t conns[AMBIT_FAST_MAX_CONNS];
    int nconns, spread, credits;
    uint64_t generation;       /* the table's generation it was installed in; any other: a miss */
    char *authority, *forwarded, *extra;
    struct fentry *chain;
} fentry;

struct fastpath {
    pthread_mutex_t lock;      /* the table, busy counts, counters' non-atomic parts */
    fentry **slots;
    size_t nslots, count, capacity;
    amap by_id;                /* entry id -> fentry */
    amap busy;                 /* conn id -> fast streams in flight on it (value cast from an integer) */
    uint64_t next_tag;
    uint64_t generation;       /* bumped by ambit_fastpath_invalidate (a new snapshot, policy, credentials) */
    int listen_fd;
    aio listen_io;
    ambit_loop *loop;
    uint64_t paused_until;     /* 0: armed */
    uint64_t counters[AMBIT_FAST_C_COUNT];
};

static const char *const COUNTER_NAMES[AMBIT_FAST_C_COUNT] = {
    "fastpath_accepted", "fastpath_hits", "fastpath_misses", "fastpath_misses_no_entry",
    "fastpath_misses_no_credit", "fastpath_misses_stale", "fastpath_misses_busy", "fastpath_misses_conn_gone", "fastpath_accept_errors",
    "fastpath_handoffs_dropped", "fastpath_entries",
};

const char *ambit_fastpath_counter_name(int index)
{
    return index >= 0 && index < AMBIT_FAST_C_COUNT ? COUNTER_NAMES[index] : "";
}

static void fctr(struct fastpath *f, int c, int64_t v) { __atomic_add_fetch(&f->counters[c], (uint64_t)v, __ATOMIC_RELAXED); }

void *fast_table_of(void **slot, size_t size, void (*init)(void *table))
{
    void *t = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (t)
        return t;
    if (!(t = calloc(1, size)))
        return NULL;
    pthread_mutex_init((pthread_mutex_t *)t, NULL); /* every table's first member is its lock */
    init(t);
    void *expected = NULL;
    if (!__atomic_compare_exchange_n(slot, &expected, t, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        pthread_mutex_destroy((pthread_mutex_t *)t);
        free(t);
        return expected;
    }
    return t;
}

#define FAST_SLOTS 1024 /* hash slots of a table, made on its first put */

int fast_slots_ready(void **slots, size_t *nslots)
{
    if (!*nslots && (*slots = calloc(FAST_SLOTS, sizeof(void *))))
        *nslots = FAST_SLOTS;
    return *nslots != 0;
}

const char *fast_put_refused(int ready, int stale, int full, int exists)
{
    return !ready ? "out of memory" : stale ? "stale generation" : full ? "table full" : exists ? "entry exists" : NULL;
}

static void fast_init(void *table)
{
    struct fastpath *f = table;
    f->listen_fd = -1;
    f->capacity = AMBIT_FAST_DEFAULT_CAPACITY;
}

static struct fastpath *fast_of(ambit_engine *e)
{
    return fast_table_of((void **)&e->fast, sizeof(struct fastpath), fast_init);
}

static uint64_t key_hash(const fkey *k)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    const uint8_t *p = (const uint8_t *)k;
    for (size_t i = 0; i < sizeof(*k); i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static int key_from_text(fkey *k, const char *src, const char *dst, int port)
{
    memset(k, 0, sizeof(*k));
    if (port <= 0 || port > 65535)
        return -1;
    k->port = (uint16_t)port;
    if (inet_pton(AF_INET, src, k->src) == 1 && inet_pton(AF_INET, dst, k->dst) == 1)
        k->family = AF_INET;
    else if (inet_pton(AF_INET6, src, k->src) == 1 && inet_pton(AF_INET6, dst, k->dst) == 1)
        k->family = AF_INET6;
    else
        return -1;
    return 0;
}

/* The accepted socket's key: its peer (as accept4 gave it) is the source pod, its local address the
 * original destination (the redirect assigned the SYN to the transparent listener, so getsockname()
 * returns what the pod dialled). */
static int key_from_fd(fkey *k, int fd, const struct sockaddr_storage *peer, int *src_port)
{
    struct sockaddr_storage b;
    const struct sockaddr_storage a = *peer;
    socklen_t bl = sizeof(b);
    memset(k, 0, sizeof(*k));
    if (getsockname(fd, (struct sockaddr *)&b, &bl) < 0 || a.ss_family != b.ss_family)
        return -1;
    k->family = (uint8_t)a.ss_family;
    if (a.ss_family == AF_INET) {
        memcpy(k->src, &((struct sockaddr_in *)&a)->sin_addr, 4);
        memcpy(k->dst, &((struct sockaddr_in *)&b)->sin_addr, 4);
        *src_port = ntohs(((struct sockaddr_in *)&a)->sin_port);
        k->port = ntohs(((struct sockaddr_in *)&b)->sin_port);
    } else if (a.ss_family == AF_INET6) {
        memcpy(k->src, &((struct sockaddr_in6 *)&a)->sin6_addr, 16);
        memcpy(k->dst, &((struct sockaddr_in6 *)&b)->sin6_addr, 16);
        *src_port = ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
        k->port = ntohs(((struct sockaddr_in6 *)&b)->sin6_port);
    } else {
        return -1;
    }
    return 0;
}

static fentry **slot_of(struct fastpath *f, const fkey *k) { return &f->slots[key_hash(k) & (f->nslots - 1)]; }

static fentry *find(struct fastpath *f, const fkey *k)
{
    if (!f->nslots)
        return NULL;
    for (fentry *x = *slot_of(f, k); x; x = x->chain)
        if (!memcmp(&x->key, k, sizeof(*k)))
            return x;
    return NULL;
}

static void unlink_entry(struct fastpath *f, fentry *x)
{
    for (fentry **pp = slot_of(f, &x->key); *pp; pp = &(*pp)->chain)
        if (*pp == x) {
            *pp = x->chain;
            break;
        }
    amap_del(&f->by_id, x->id);
    f->count--;
    fctr(f, AMBIT_FAST_C_ENTRIES, -1);
}

static void entry_free(fentry *x)
{
    free(x->authority);
    free(x->forwarded);
    free(x->extra);
    free(x);
}

static void busy_add(struct fastpath *f, uint64_t conn, int delta)
{
    intptr_t n = (intptr_t)amap_get(&f->busy, conn) + delta;
    if (n > 0)
        amap_put(&f->busy, conn, (void *)n);
    else
        amap_del(&f->busy, conn);
}

int ambit_fastpath_set_capacity(ambit_engine *e, int capacity)
{
    struct fastpath *f = fast_of(e);
    if (!f || capacity < 0)
        return -1;
    pthread_mutex_lock(&f->lock);
    f->capacity = (size_t)capacity;
    pthread_mutex_unlock(&f->lock);
    return 0;
}

uint64_t ambit_fastpath_invalidate(ambit_engine *e)
{
    struct fastpath *f = fast_of(e);
    if (!f)
        return 0;
    pthread_mutex_lock(&f->lock);
    uint64_t g = ++f->generation;
    pthread_mutex_unlock(&f->lock);
    return g;
}

uint64_t ambit_fastpath_generation(ambit_engine *e)
{
    struct fastpath *f = fast_of(e);
    if (!f)
        return 0;
    pthread_mutex_lock(&f->lock);
    uint64_t g = f->generation;
    pthread_mutex_unlock(&f->lock);
    return g;
}

int ambit_fastpath_put(ambit_engine *e, uint64_t entry_id, uint64_t generation, const char *src_ip, const char *dst_ip, int dst_port,
                       const uint64_t *conns, int nconns, int spread, int credits, const char *authority,
                       const char *forwarded, const char *extra, char *err, size_t errlen)
{
    struct fastpath *f = fast_of(e);
    fkey k;
    const char *why = NULL;
    if (!f)
        why = "out of memory";
    else if (key_from_text(&k, src_ip, dst_ip, dst_port) < 0)
        why = "bad address or port";
    else if (nconns < 1 || nconns > AMBIT_FAST_MAX_CONNS || credits < 1 || spread < 1)
        why = "bad connections, spread or credits";
    else if (!authority || !*authority || strlen(authority) >= AMBIT_HEADER_MAX ||
             (forwarded && key_from_text(&(fkey){0}, forwarded, forwarded, 1) < 0) ||
             (extra && strlen(extra) > AMBIT_EXTRA_BYTES - FAST_TP_LINE))
        why = "bad authority or headers";
    if (why) {
        copy_str(err, errlen, why);
        return -1;
    }
    fentry *x = calloc(1, sizeof(*x));
    if (!x || !(x->authority = strdup(authority)) || (forwarded && !(x->forwarded = strdup(forwarded))) ||
        (extra && !(x->extra = strdup(extra)))) {
        if (x)
            entry_free(x);
        copy_str(err, errlen, "out of memory");
        return -1;
    }
    x->id = entry_id;
    x->key = k;
    memcpy(x->conns, conns, sizeof(uint64_t) * (size_t)nconns);
    x->nconns = nconns;
    x->spread = spread;
    x->credits = credits;
    x->generation = generation;
    pthread_mutex_lock(&f->lock);
    int ready = fast_slots_ready((void **)&f->slots, &f->nslots);
    why = fast_put_refused(ready, generation != f->generation, f->count >= f->capacity,
                           ready && (find(f, &k) || amap_get(&f->by_id, entry_id)));
    if (why || amap_put(&f->by_id, entry_id, x) < 0) {
        why = why ? why : "out of memory";
        pthread_mutex_unlock(&f->lock);
        entry_free(x);
        copy_str(err, errlen, why);
        return -1;
    }
    fentry **slot = slot_of(f, &k);
    x->chain = *slot;
    *slot = x;
    f->count++;
    fctr(f, AMBIT_FAST_C_ENTRIES, 1);
    pthread_mutex_unlock(&f->lock);
    return 0;
}

int ambit_fastpath_add_credits(ambit_engine *e, uint64_t entry_id, int credits)
{
    struct fastpath *f = fast_of(e);
    if (!f || credits < 1)
        return -1;
    pthread_mutex_lock(&f->lock);
    fentry *x = amap_get(&f->by_id, entry_id);
    if (x)
        x->credits += credits;
    pthread_mutex_unlock(&f->lock);
    return x ? 0 : -1;
}

int ambit_fastpath_remove(ambit_engine *e, uint64_t entry_id)
{
    struct fastpath *f = fast_of(e);
    if (!f)
        return -1;
    pthread_mutex_lock(&f->lock);
    fentry *x = amap_get(&f->by_id, entry_id);
    int left = -1;
    if (x) {
        left = x->credits;
        unlink_entry(f, x);
    }
    pthread_mutex_unlock(&f->lock);
    if (x)
        entry_free(x);
    return left;
}

void ambit_fastpath_counters(ambit_engine *e, uint64_t *out, int n)
{
    struct fastpath *f = fast_of(e);
    for (int i = 0; i < n && i < AMBIT_FAST_C_COUNT; i++)
        out[i] = f ? __atomic_load_n(&f->counters[i], __ATOMIC_RELAXED) : 0;
}

/* The accepted fd goes to Python (event status = fd); when the event cannot be queued the fd is closed
 * (the client sees a reset, counted) rather than leaked. */
static void hand_off(ambit_engine *e, int fd, uint64_t tag)
{
    struct fastpath *f = e->fast;
    ambit_event ev;
    event_init(&ev, AMBIT_EV_FAST_MISS, 0, 0, tag);
    ev.status = fd;
    fctr(f, AMBIT_FAST_C_MISSES, 1);
    if (event_emit(e, &ev) < 0) {
        fctr(f, AMBIT_FAST_C_HANDOFFS_DROPPED, 1);
        reset_close(fd);
    }
}

/* Under the lock: the least busy live connection of the entry, or 0 for a miss (and which). */
/* The least busy connection; among equally busy ones, one on the accepting loop (the listener's), whose
 * open then needs no post to another loop (an eventfd write and that thread's wake-up per connection). */
static uint64_t pick(struct fastpath *f, fentry *x, int *miss, uint64_t nloops)
{
    if (x->generation != f->generation) {
        *miss = AMBIT_FAST_C_MISSES_STALE;
        return 0;
    }
    if (x->credits <= 0) {
        *miss = AMBIT_FAST_C_MISSES_NO_CREDIT;
        return 0;
    }
    uint64_t best = 0, local = (uint64_t)f->loop->index;
    intptr_t best_busy = 0;
    for (int i = 0; i < x->nconns; i++) {
        intptr_t b = (intptr_t)amap_get(&f->busy, x->conns[i]);
        int tie_local = b == best_busy && x->conns[i] % nloops == local && best % nloops != local;
        if (!best || b < best_busy || tie_local) {
            best = x->conns[i];
            best_busy = b;
        }
    }
    /* As the pool spreads a busy key: while every connection carries a stream and the key may have more
     * connections, Python opens another (the engine never dials). */
    if (best_busy > 0 && x->nconns < x->spread) {
        *miss = AMBIT_FAST_C_MISSES_BUSY;
        return 0;
    }
    return best;
}

/* `forwarded: for="<ip>:<port>"` (RFC 7239 section 6; IPv6 bracketed) naming the client and its source
 * port, as the ordinary path (Engine.open_stream with forwarded_port) and ztunnel send it. */
static char *forwarded_for(const char *ip, int port)
{
    char buf[AMBIT_HEADER_MAX];
    const char *fmt = strchr(ip, ':') ? "for=\"[%s]:%d\"" : "for=\"%s:%d\"";
    if (snprintf(buf, sizeof(buf), fmt, ip, port) >= (int)sizeof(buf))
        return NULL;
    return strdup(buf);
}

/* `peer`: what accept4 said (no getpeername); TCP_NODELAY comes from the listener (fastpath_listen). */
static void accept_one(ambit_engine *e, struct fastpath *f, int fd, const struct sockaddr_storage *peer)
{
    fkey k;
    int src_port = 0, miss = AMBIT_FAST_C_MISSES_NO_ENTRY;
    fctr(f, AMBIT_FAST_C_ACCEPTED, 1);
    acmd *c = calloc(1, sizeof(*c));
    if (!c || key_from_fd(&k, fd, peer, &src_port) < 0) {
        free(c);
        hand_off(e, fd, 0); /* Python reports what it can (a connection already gone, out of memory) */
        return;
    }
    c->kind = CMD_FAST_OPEN;
    c->fd = fd;
    c->fd2 = -1;
    pthread_mutex_lock(&f->lock);
    fentry *x = find(f, &k);
    uint64_t conn = x ? pick(f, x, &miss, (uint64_t)e->nloops) : 0;
    if (conn) {
        size_t extra = (x->extra ? strlen(x->extra) : 0) + FAST_TP_LINE;
        c->text = strdup(x->authority);
        c->text2 = x->forwarded ? forwarded_for(x->forwarded, src_port) : NULL;
        c->text3 = malloc(extra);
        if (!c->text || (x->forwarded && !c->text2) || !c->text3) {
            conn = 0;
            miss = AMBIT_FAST_C_MISSES_NO_ENTRY;
        } else {
            snprintf(c->text3, extra, "%s", x->extra ? x->extra : "");
            x->credits--;
            busy_add(f, conn, 1);
            c->id = conn;
            c->aux = x->id;
            c->status = src_port;
            c->tag = AMBIT_FAST_TAG_BIT | ++f->next_tag;
        }
    }
    pthread_mutex_unlock(&f->lock);
    if (!conn) {
        free(c->text);
        free(c->text2);
        free(c->text3);
        free(c);
        fctr(f, miss, 1);
        hand_off(e, fd, 0);
        return;
    }
    c->id2 = engine_new_id(&e->next_stream_id);
    loop_post_cmd(e, conn, c);
}

static void on_listen(ambit_loop *l, aio *io, uint32_t events)
{
    (void)events;
    ambit_engine *e = l->engine;
    struct fastpath *f = e->fast;
    for (int i = 0; i < FAST_ACCEPT_BATCH; i++) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof(peer);
        int fd = accept4(io->fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            accept_one(e, f, fd, &peer);
            continue;
        }
        if (errno == EAGAIN || errno == EINTR)
            return;
        fctr(f, AMBIT_FAST_C_ACCEPT_ERRORS, 1);
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            /* Retrying before something is freed cannot succeed: the backlog waits in the kernel. */
            struct epoll_event ev = {.events = 0, .data.ptr = io};
            epoll_ctl(l->epfd, EPOLL_CTL_MOD, io->fd, &ev);
            f->paused_until = now_ms() + FAST_PAUSE_MS;
        }
        return;
    }
}

void fastpath_tick(ambit_loop *l)
{
    struct fastpath *f = l->engine->fast;
    if (!f || f->loop != l || !f->paused_until || now_ms() < f->paused_until)
        return;
    f->paused_until = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &f->listen_io};
    epoll_ctl(l->epfd, EPOLL_CTL_MOD, f->listen_fd, &ev);
}

int ambit_fastpath_listen(ambit_engine *e, int fd, char *err, size_t errlen)
{
    struct fastpath *f = fast_of(e);
    const char *why = !f ? "out of memory" : e->stopped || !e->started ? "engine not running"
                      : f->listen_fd >= 0                         ? "already listening"
                      : set_nonblock(fd) < 0                      ? "bad file descriptor"
                                                                  : NULL;
    if (!why) {
        set_nodelay(fd); /* inherited by every accepted socket: one setsockopt, not one per connection */
        f->loop = &e->loops[0];
        f->listen_io.fd = fd;
        f->listen_io.on_event = on_listen;
        f->listen_io.owner = f;
        /* Level-triggered, unlike the loop's other fds: a batch leaves the rest of the backlog readable. */
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &f->listen_io};
        f->listen_fd = fd;
        if (epoll_ctl(f->loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            f->listen_fd = -1;
            why = "epoll";
        }
    }
    if (why) {
        copy_str(err, errlen, why);
        close(fd);
        return -1;
    }
    return 0;
}

/* A fast open that did not happen: the connection is no busier, and the entry (when still installed) gets
 * its credit back, so Python's reserved budget unit is returned with the entry's remaining credits. */
static void undo_take(struct fastpath *f, const acmd *c)
{
    pthread_mutex_lock(&f->lock);
    busy_add(f, c->id, -1);
    fentry *x = amap_get(&f->by_id, c->aux);
    if (x)
        x->credits++;
    pthread_mutex_unlock(&f->lock);
}

/* On the connection's loop: the connection may have stopped taking streams since the lookup (GOAWAY,
 * closing, failed): then the client goes to Python, which opens it elsewhere. */
void fastpath_run_open(ambit_loop *l, acmd *c)
{
    ambit_engine *e = l->engine;
    struct fastpath *f = e->fast;
    unsigned char r[24];
    int usable = hconn_client_usable(l, c->id);
    /* Without randomness for a trace id Python opens it instead (its own generator). */
    if (!usable || rand_take(r, sizeof(r)) != 0) {
        undo_take(f, c);
        if (!usable)
            fctr(f, AMBIT_FAST_C_MISSES_CONN_GONE, 1);
        hand_off(e, c->fd, 0);
        c->fd = -1;
        return;
    }
    r[0] |= 1; /* W3C: an all-zero trace id or span id is invalid */
    r[16] |= 1;
    ambit_event ev;
    event_init(&ev, AMBIT_EV_FAST_OPEN, c->id, c->id2, c->tag);
    /* "00-<32 hex trace id>-<16 hex span id>-00" (55 chars), hex by table: 26 snprintf calls per new
     * connection were a visible share of the loop's user time. */
    static const char hex[] = "0123456789abcdef";
    char *t = ev.traceparent;
    memcpy(t, "00-", 3);
    t += 3;
    for (int i = 0; i < 24; i++) {
        if (i == 16)
            *t++ = '-';
        *t++ = hex[r[i] >> 4];
        *t++ = hex[r[i] & 15];
    }
    memcpy(t, "-00", 4); /* with the NUL */
    size_t used = strlen(c->text3);
    snprintf(c->text3 + used, FAST_TP_LINE, "traceparent: %.55s\n", ev.traceparent);
    ev.status = c->status; /* the client's source port */
    ev.bytes_in = c->aux;  /* the entry it was opened by */
    copy_str(ev.authority, sizeof(ev.authority), c->text);
    fctr(f, AMBIT_FAST_C_HITS, 1);
    /* Before the stream's own events (same loop thread, same queue): Python creates its table entry first.
     * A stream Python could never learn of is not opened: the client is reset (counted). */
    if (event_emit(e, &ev) < 0) {
        undo_take(f, c);
        fctr(f, AMBIT_FAST_C_HANDOFFS_DROPPED, 1);
        reset_close(c->fd);
        c->fd = -1;
        return;
    }
    hconn_open_stream(l, c);
}

void fastpath_stream_done(ambit_engine *e, uint64_t conn_id)
{
    struct fastpath *f = e->fast;
    if (!f)
        return;
    pthread_mutex_lock(&f->lock);
    busy_add(f, conn_id, -1);
    pthread_mutex_unlock(&f->lock);
}

/* After the loops stopped: the listener, the table, and the fds of hand-offs never drained go with the
 * engine. */
void fastpath_free(ambit_engine *e)
{
    fastin_free(e);
    struct fastpath *f = e->fast;
    if (!f)
        return;
    if (f->listen_fd >= 0)
        close(f->listen_fd);
    for (size_t i = 0; i < e->ev_count; i++) { /* accepted sockets Python never took */
        const ambit_event *ev = &e->evq[(e->ev_head + i) % e->ev_cap];
        if (ev->kind == AMBIT_EV_FAST_MISS && ev->status >= 0)
            close(ev->status);
    }
    for (size_t i = 0; i < f->nslots; i++)
        for (fentry *x = f->slots[i], *next; x; x = next) {
            next = x->chain;
            entry_free(x);
        }
    free(f->slots);
    amap_free(&f->by_id);
    amap_free(&f->busy);
    pthread_mutex_destroy(&f->lock);
    free(f);
    e->fast = NULL;
}
