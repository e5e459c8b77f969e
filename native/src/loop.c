/* Engine object, loop threads, the Python->C command queue and the C->Python event queue. */
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define TRIM_AFTER_CLOSED 64 /* connections, streams and splices closed since the last trim */
#define TRIM_INTERVAL_MS 1000
#define SETTLE_TRIMS 10        /* trims after a burst, at most, while closes trickle on */
#define STARTUP_SETTLE_MS 2000 /* the agent is ready ~1 s after its engine started */
#define MMAP_THRESHOLD (128 * 1024)
#define MALLOC_ARENAS 2
#define EVQ_MAX (1 << 16) /* events kept for a Python side that stops draining; beyond: counted, dropped */

static const char *counter_names[AMBIT_C_COUNT] = {
    "conns_opened", "conns_closed", "conns_active", "handshakes_done", "handshakes_resumed",
    "streams_opened", "streams_closed", "streams_active", "streams_refused", "streams_reset",
    "stream_bytes_in", "stream_bytes_out", "tls_bytes_in", "tls_bytes_out", "splices_opened",
    "splices_closed", "splices_active", "splice_bytes", "errors_handshake", "errors_peer_identity",
    "errors_protocol", "errors_io", "errors_command", "events_dropped", "resets_lingered",
    "streams_reset_early", "refused_handshakes", "refused_conns_source", "refused_streams_peer",
    "refused_streams_conn", "reset_floods", "malloc_trims",
};

const char *ambit_counter_name(int index)
{
    return (index >= 0 && index < AMBIT_C_COUNT) ? counter_names[index] : NULL;
}

uint64_t engine_new_id(uint64_t *counter)
{
    return __atomic_add_fetch(counter, 1, __ATOMIC_RELAXED);
}

static void set_err(char *err, size_t errlen, const char *msg)
{
    if (err)
        copy_str(err, errlen, msg);
}

void event_init(ambit_event *ev, int kind, uint64_t conn_id, uint64_t stream_id, uint64_t tag)
{
    memset(ev, 0, sizeof(*ev));
    ev->kind = kind;
    ev->conn_id = conn_id;
    ev->stream_id = stream_id;
    ev->tag = tag;
}

/* On a loop thread the eventfd write that wakes Python waits for the end of the epoll batch being handled:
 * the events of one batch (many connections' opens and closes under load) cost Python one wake-up. */
static __thread int wake_deferred, wake_pending;

static void wake_python(ambit_engine *e)
{
    uint64_t one = 1;
    (void)!write(e->evfd, &one, sizeof(one));
}

/* Informational events (a fast path stream opened, a stream up or ended: Python records them, decides
 * nothing) wake Python at most EV_LAZY_MS after the first of them, or once EV_LAZY_MAX are queued, or with
 * the next event that needs a decision: under load one wake-up carries many connections' events instead of
 * one or two. Only on loop threads (the loop that queued them arms its epoll timeout for the deadline). */
#define EV_LAZY_MS 5
#define EV_LAZY_MAX 128

static int event_lazy(int kind)
{
    switch (kind) {
    case AMBIT_EV_FAST_OPEN:
    case AMBIT_EV_STREAM_OPEN:
    case AMBIT_EV_STREAM_CLOSED:
    case AMBIT_EV_SPLICE_CLOSED:
    case AMBIT_EV_STREAM_ACCEPTED:
    case AMBIT_EV_FAST_ACCEPT:
        return 1;
    default:
        return 0;
    }
}

/* End of a loop batch: -1 when no informational event waits, 0 when Python was just woken for them, else
 * the ms left until their deadline (the loop's epoll timeout). */
static int event_lazy_due(ambit_engine *e)
{
    int left = -1;
    pthread_mutex_lock(&e->ev_lock);
    if (!e->ev_woken && e->ev_count) {
        uint64_t now = now_ms();
        if (now >= e->ev_lazy_since + EV_LAZY_MS) {
            e->ev_woken = 1;
            left = 0;
        } else {
            left = (int)(e->ev_lazy_since + EV_LAZY_MS - now);
        }
    }
    pthread_mutex_unlock(&e->ev_lock);
    if (left == 0)
        wake_python(e);
    return left;
}

int event_emit(ambit_engine *e, const ambit_event *ev)
{
    int wake = 0;
    pthread_mutex_lock(&e->ev_lock);
    if (e->ev_count == e->ev_cap) {
        size_t cap = e->ev_cap ? e->ev_cap * 2 : 256;
        ambit_event *q = cap <= EVQ_MAX ? malloc(cap * sizeof(*q)) : NULL;
        if (!q) {
            pthread_mutex_unlock(&e->ev_lock);
            ctr_add(e, AMBIT_C_EVENTS_DROPPED, 1);
            return -1;
        }
        for (size_t i = 0; i < e->ev_count; i++)
            q[i] = e->evq[(e->ev_head + i) % e->ev_cap];
        free(e->evq);
        e->evq = q;
        e->ev_head = 0;
        e->ev_cap = cap;
    }
    e->evq[(e->ev_head + e->ev_count) % e->ev_cap] = *ev;
    e->ev_count++;
    if (!e->ev_woken) {
        if (!wake_deferred || !event_lazy(ev->kind) || e->ev_count >= EV_LAZY_MAX) {
            wake = e->ev_woken = 1;
        } else if (e->ev_count == 1) {
            e->ev_lazy_since = now_ms();
        }
    }
    pthread_mutex_unlock(&e->ev_lock);
    if (wake && wake_deferred)
        wake_pending = 1;
    else if (wake)
        wake_python(e);
    return 0;
}

int ambit_engine_events(ambit_engine *e, ambit_event *out, int max)
{
    uint64_t v;
    /* Clear readiness first: an event pushed after this read re-arms the fd. */
    (void)!read(e->evfd, &v, sizeof(v));
    pthread_mutex_lock(&e->ev_lock);
    int n = 0;
    while (n < max && e->ev_count) {
        out[n++] = e->evq[e->ev_head];
        e->ev_head = (e->ev_head + 1) % e->ev_cap;
        e->ev_count--;
    }
    int more = e->ev_count > 0;
    if (!more)
        e->ev_woken = 0; /* the next event wakes (or, informational, starts a deadline) anew */
    if (!more && e->ev_cap > 256) {
        /* A burst (e.g. thousands of failed handshakes) grew the queue: give it back once drained. */
        free(e->evq);
        e->evq = NULL;
        e->ev_cap = e->ev_head = 0;
    }
    pthread_mutex_unlock(&e->ev_lock);
    if (more) {
        uint64_t one = 1;
        (void)!write(e->evfd, &one, sizeof(one));
    }
    return n;
}

int ambit_engine_eventfd(ambit_engine *e) { return e->evfd; }

int ambit_engine_set_limit(ambit_engine *e, int which, int value)
{
    if (which < 0 || which >= AMBIT_L_COUNT || value < 0)
        return -1;
    if (which == AMBIT_L_STREAM_BUFFER && (value < 16384 || value > AMBIT_STREAM_INBUF_MAX))
        return -1;
    if (which == AMBIT_L_MAX_CONCURRENT_STREAMS && value < 1)
        return -1;
    __atomic_store_n(&e->limits[which], value, __ATOMIC_RELAXED);
    return 0;
}

void ambit_engine_counters(ambit_engine *e, uint64_t *out, int n)
{
    for (int i = 0; i < n && i < AMBIT_C_COUNT; i++)
        out[i] = __atomic_load_n(&e->counters[i], __ATOMIC_RELAXED);
}

int loop_add_fd(ambit_loop *l, aio *io, int fd)
{
    io->fd = fd;
    /* Edge-triggered: every handler drains until EAGAIN or until it deliberately parks work on a list. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = io};
    return epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev);
}

int loop_move_fd(ambit_loop *l, aio *io, int fd)
{
    io->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = io};
    return epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev);
}

void loop_del_fd(ambit_loop *l, aio *io)
{
    if (io->fd >= 0)
        epoll_ctl(l->epfd, EPOLL_CTL_DEL, io->fd, NULL);
}

static void cmd_free(acmd *c)
{
    if (c->fd >= 0)
        close(c->fd);
    if (c->fd2 >= 0)
        close(c->fd2);
    if (c->ctx)
        SSL_CTX_free(c->ctx);
    free(c->text);
    free(c->text2);
    free(c->text3);
    if (c->query)
        flows_abandon(c->query);
    free(c);
}

static void cmd_run(ambit_loop *l, acmd *c)
{
    switch (c->kind) {
    case CMD_CONNECT: hconn_start(l, c, 0); break;
    case CMD_SERVE: hconn_start(l, c, 1); break;
    case CMD_OPEN_STREAM: hconn_open_stream(l, c); break;
    case CMD_FAST_OPEN: fastpath_run_open(l, c); break;
    case CMD_ACCEPT_CONNECT: accept_connect_start(l, c); break;
    case CMD_ACCEPT: hconn_accept(l, c); break;
    case CMD_REJECT: hconn_reject(l, c); break;
    case CMD_RESET: hconn_reset(l, c); break;
    case CMD_SPLICE: pump_start(l, c); break;
    case CMD_FLOW_STATS:
        flows_answer(l, c->query);
        c->query = NULL;
        break;
    case CMD_CLOSE:
        if (!hconn_close_cmd(l, c->id) && !pump_close_cmd(l, c->id))
            ctr_add(l->engine, AMBIT_C_ERRORS_COMMAND, 1);
        break;
    }
    cmd_free(c); /* handlers take what they keep (fds set to -1, ctx/text to NULL) */
}

static void on_wake(ambit_loop *l, aio *io, uint32_t events)
{
    (void)io;
    (void)events;
    uint64_t v;
    (void)!read(l->wakefd, &v, sizeof(v));
    pthread_mutex_lock(&l->cmd_lock);
    acmd *c = l->cmd_head;
    l->cmd_head = l->cmd_tail = NULL;
    pthread_mutex_unlock(&l->cmd_lock);
    while (c) {
        acmd *next = c->next;
        cmd_run(l, c);
        c = next;
    }
}

/* The engine owns the process's malloc policy (the agent and the gateway both host it; docs/footprint.md).
 * Connection state is allocated and freed on the loop threads, whose glibc arenas keep freed memory
 * (a burst of 10,000 aborted handshakes left ~350 MB resident with nothing alive). While connections,
 * streams or splices close in numbers, at most once a second, hand the free pages back to the kernel;
 * then while they keep closing or the host is still draining their events (at most SETTLE_TRIMS times),
 * and once more after a quiet second: for what closed after the last trim and what the host freed of its
 * own records meanwhile, after the events (malloc_trim walks every arena, the host's threads' too). A
 * measured agent side freed its records up to ~10 s after 4,000 connections closed. Start-up counts as
 * a burst: STARTUP_SETTLE_MS after the engine started, the host's start-up (imports, TLS contexts, the
 * first config) is over, and what it freed goes back (~1 MiB for an idle agent). */
static uint64_t closed_total(ambit_engine *e)
{
    static const int closes[] = {AMBIT_C_CONNS_CLOSED, AMBIT_C_STREAMS_CLOSED, AMBIT_C_SPLICES_CLOSED};
    uint64_t n = 0;
    for (size_t i = 0; i < sizeof(closes) / sizeof(closes[0]); i++)
        n += __atomic_load_n(&e->counters[closes[i]], __ATOMIC_RELAXED);
    return n;
}

static void maybe_trim(ambit_engine *e)
{
    uint64_t now = now_ms();
    if (now < e->trim_not_before_ms || now - e->last_trim_ms < TRIM_INTERVAL_MS)
        return;
    uint64_t closed = closed_total(e);
    uint64_t since = closed - e->closed_at_trim;
    pthread_mutex_lock(&e->ev_lock);
    int drained = e->ev_count == 0;
    pthread_mutex_unlock(&e->ev_lock);
    if (since >= TRIM_AFTER_CLOSED)
        e->trim_settling = SETTLE_TRIMS;
    else if (!e->trim_settling)
        return;
    else if (since == 0 && drained && e->trim_drained)
        e->trim_settling = 0; /* quiet, and the host had a second to handle the last events: the last trim */
    else
        e->trim_settling--; /* still closing (pooled connections after their streams), or the host still
                             * handling the close events (it frees its records as it goes) */
    e->trim_drained = drained;
    e->closed_at_trim = closed;
    e->last_trim_ms = now;
    malloc_trim(0);
    ctr_add(e, AMBIT_C_MALLOC_TRIMS, 1);
}

static void on_tick(ambit_loop *l, aio *io, uint32_t events)
{
    (void)events;
    uint64_t v;
    (void)!read(io->fd, &v, sizeof(v));
    hconn_tick(l);
    linger_tick(l);
    fastpath_tick(l);
    /* Not here: an expired connect is freed, and an event for it may still follow in this batch. */
    l->upconns_tick_due = 1;
    if (l->index == 0)
        maybe_trim(l->engine);
}

uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void ambit_engine_set_timeouts(ambit_engine *e, int handshake_ms, int keepalive_idle_ms, int keepalive_timeout_ms)
{
    __atomic_store_n(&e->handshake_timeout_ms, handshake_ms, __ATOMIC_RELAXED);
    __atomic_store_n(&e->keepalive_idle_ms, keepalive_idle_ms, __ATOMIC_RELAXED);
    __atomic_store_n(&e->keepalive_timeout_ms, keepalive_timeout_ms, __ATOMIC_RELAXED);
}

static void *loop_main(void *arg)
{
    ambit_loop *l = arg;
    struct epoll_event evs[256];
    /* A write to a reset socket must fail with EPIPE, not kill the host process. */
    sigset_t pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, NULL);
    wake_deferred = 1;
    int lazy_ms = -1; /* informational events this loop queued are due in lazy_ms */
    while (__atomic_load_n(&l->running, __ATOMIC_ACQUIRE)) {
        int n = epoll_wait(l->epfd, evs, 256, (l->ready || l->dirty) ? 0 : lazy_ms);
        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++) {
            aio *io = evs[i].data.ptr;
            io->on_event(l, io, evs[i].events);
        }
        if (l->upconns_tick_due) {
            l->upconns_tick_due = 0;
            accept_connect_tick(l);
        }
        hconn_process_pending(l);
        pump_process_pending(l);
        linger_reap(l, 0);
        if (wake_pending) {
            wake_pending = 0;
            wake_python(l->engine);
        }
        lazy_ms = event_lazy_due(l->engine);
    }
    if (wake_pending || lazy_ms > 0)
        wake_python(l->engine);
    accept_connect_destroy_all(l);
    hconn_destroy_all(l);
    pump_destroy_all(l);
    linger_reap(l, 1);
    return NULL;
}

/* Only a post to an empty queue wakes the loop: a non-empty queue's first command was posted with a wake
 * the loop has not yet answered with its take (on_wake reads the eventfd before it takes the whole queue,
 * and that post's write follows its append), so the take that runs it runs this one too. A burst of
 * commands (the proxy's accept_connects of one event drain, the fast path's opens of one accept batch)
 * costs one eventfd write, and the loop one read, not one each. (Reverted once: the stress test lost
 * server_abort bytes with it; the cause was the linger's "transmitted" test (linger.c), which only showed
 * under that timing: with the old linger and this wake-up 1 of 24 loaded runs lost bytes, with the fixed
 * linger 0 of 48.) */
void loop_post(ambit_loop *l, acmd *c)
{
    c->next = NULL;
    pthread_mutex_lock(&l->cmd_lock);
    int was_empty = l->cmd_head == NULL;
    if (l->cmd_tail)
        l->cmd_tail->next = c;
    else
        l->cmd_head = c;
    l->cmd_tail = c;
    pthread_mutex_unlock(&l->cmd_lock);
    if (was_empty) {
        uint64_t one = 1;
        (void)!write(l->wakefd, &one, sizeof(one));
    }
}

void loop_post_cmd(ambit_engine *e, uint64_t id, acmd *c) { loop_post(&e->loops[id % (uint64_t)e->nloops], c); }

/* The process's malloc policy, set when the engine is loaded (the host imports it before it starts its
 * threads, so they all get it). Per-connection buffers of 128 KiB and more (TLS read-ahead, record
 * coalescing, stream buffers) are freed on the loop threads in bursts. With glibc's dynamic mmap threshold
 * the first free raises the threshold and later buffers come from the thread arenas, whose freed space
 * stays resident between live chunks (~2 KB per aborted handshake, for good). A fixed threshold keeps
 * them mmapped, so freeing one returns it to the kernel. At most two arenas: glibc would make one per
 * thread that allocates (up to 8 per core: gRPC's, the host's, the loops), each keeping its own free
 * space; two cost 0.5-1 MiB less idle and 1-2 MiB less at 1,000 connections (docs/footprint.md). */
__attribute__((constructor)) static void malloc_policy(void)
{
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    mallopt(M_ARENA_MAX, MALLOC_ARENAS);
}

ambit_engine *ambit_engine_new(int threads, char *err, size_t errlen)
{
    if (threads < 1 || threads > 64) {
        set_err(err, errlen, "threads must be 1..64");
        return NULL;
    }
    ambit_engine *e = calloc(1, sizeof(*e));
    if (!e) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&e->ev_lock, NULL);
    pthread_mutex_init(&e->ctx_lock, NULL);
    pthread_mutex_init(&e->limits_lock, NULL);
    ambit_engine_set_timeouts(e, 10000, 30000, 10000);
    static const int defaults[AMBIT_L_COUNT] = {
        [AMBIT_L_PENDING_HANDSHAKES] = 4096,
        [AMBIT_L_PENDING_PER_SOURCE] = 512,
        [AMBIT_L_MAX_CONCURRENT_STREAMS] = AMBIT_DEFAULT_MAX_STREAMS,
        [AMBIT_L_RESETS_PER_S] = 200,
        [AMBIT_L_STREAM_BUFFER] = AMBIT_STREAM_INBUF,
        [AMBIT_L_CONN_BUFFER] = AMBIT_CONN_INBUF,
    };
    memcpy(e->limits, defaults, sizeof(defaults));
    e->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->loops = calloc((size_t)threads, sizeof(ambit_loop));
    if (e->evfd < 0 || !e->loops) {
        set_err(err, errlen, "cannot allocate engine");
        ambit_engine_free(e);
        return NULL;
    }
    for (int i = 0; i < threads; i++) {
        ambit_loop *l = &e->loops[i];
        l->engine = e;
        l->index = i;
        pthread_mutex_init(&l->cmd_lock, NULL);
        l->epfd = epoll_create1(EPOLL_CLOEXEC);
        l->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        l->rbuf = malloc(AMBIT_READ_CHUNK);
        e->nloops = i + 1;
        l->wake_io.on_event = on_wake;
        l->wake_io.owner = l;
        l->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        l->timer_io.on_event = on_tick;
        l->timer_io.owner = l;
        struct itimerspec tick = {{0, AMBIT_TICK_MS * 1000000L}, {0, AMBIT_TICK_MS * 1000000L}};
        if (l->epfd < 0 || l->wakefd < 0 || l->timerfd < 0 || !l->rbuf ||
            loop_add_fd(l, &l->wake_io, l->wakefd) < 0 || timerfd_settime(l->timerfd, 0, &tick, NULL) < 0 ||
            loop_add_fd(l, &l->timer_io, l->timerfd) < 0) {
            set_err(err, errlen, strerror(errno));
            ambit_engine_free(e);
            return NULL;
        }
    }
    return e;
}

int ambit_engine_start(ambit_engine *e, char *err, size_t errlen)
{
    if (e->started) {
        set_err(err, errlen, "engine already started");
        return -1;
    }
    e->started = 1;
    e->trim_not_before_ms = now_ms() + STARTUP_SETTLE_MS;
    e->trim_settling = SETTLE_TRIMS;
    e->trim_drained = 1; /* start-up: one trim once it is over, no close events to wait for */
    for (int i = 0; i < e->nloops; i++) {
        ambit_loop *l = &e->loops[i];
        l->running = 1;
        if (pthread_create(&l->thread, NULL, loop_main, l) != 0) {
            l->running = 0;
            set_err(err, errlen, "cannot start loop thread");
            ambit_engine_stop(e);
            return -1;
        }
    }
    return 0;
}

void ambit_engine_stop(ambit_engine *e)
{
    if (e->stopped)
        return;
    e->stopped = 1;
    for (int i = 0; i < e->nloops; i++) {
        ambit_loop *l = &e->loops[i];
        if (!l->running)
            continue;
        __atomic_store_n(&l->running, 0, __ATOMIC_RELEASE);
        uint64_t one = 1;
        (void)!write(l->wakefd, &one, sizeof(one));
        pthread_join(l->thread, NULL);
    }
    /* Commands never run (engine stopped before they were processed) still own fds. */
    for (int i = 0; i < e->nloops; i++) {
        ambit_loop *l = &e->loops[i];
        for (acmd *c = l->cmd_head, *next; c; c = next) {
            next = c->next;
            cmd_free(c);
        }
        l->cmd_head = l->cmd_tail = NULL;
    }
}

void ambit_engine_free(ambit_engine *e)
{
    if (!e)
        return;
    ambit_engine_stop(e);
    for (int i = 0; i < e->nloops; i++) {
        ambit_loop *l = &e->loops[i];
        if (l->epfd >= 0)
            close(l->epfd);
        if (l->wakefd >= 0)
            close(l->wakefd);
        if (l->timerfd >= 0)
            close(l->timerfd);
        free(l->rbuf);
        amap_free(&l->conns);
        amap_free(&l->splices);
        amap_free(&l->streams);
        pthread_mutex_destroy(&l->cmd_lock);
    }
    free(e->loops);
    for (tls_ctx_entry *t = e->ctxs, *next; t; t = next) {
        next = t->next;
        SSL_CTX_free(t->ctx);
        free(t);
    }
    if (e->evfd >= 0)
        close(e->evfd);
    fastpath_free(e); /* before the event queue: undelivered hand-offs still own their fds */
    free(e->evq);
    pthread_mutex_destroy(&e->ev_lock);
    pthread_mutex_destroy(&e->ctx_lock);
    limits_free(e);
    free(e->peer_domains);
    pthread_mutex_destroy(&e->limits_lock);
    free(e);
}

int64_t ambit_tls_context(ambit_engine *e, int server, const char *chain_pem, size_t chain_len,
                          const char *key_pem, size_t key_len, const char *bundle_pem, size_t bundle_len,
                          int tls12, char *err, size_t errlen)
{
    SSL_CTX *ctx = tls_ctx_build(server, chain_pem, chain_len, key_pem, key_len, bundle_pem, bundle_len, tls12,
                                 err, errlen);
    if (!ctx)
        return -1;
    tls_ctx_entry *t = malloc(sizeof(*t));
    if (!t) {
        SSL_CTX_free(ctx);
        set_err(err, errlen, "out of memory");
        return -1;
    }
    t->id = (int64_t)engine_new_id(&e->next_ctx_id);
    t->ctx = ctx;
    pthread_mutex_lock(&e->ctx_lock);
    t->next = e->ctxs;
    e->ctxs = t;
    pthread_mutex_unlock(&e->ctx_lock);
    return t->id;
}

int ambit_free_tls_context(ambit_engine *e, int64_t id)
{
    pthread_mutex_lock(&e->ctx_lock);
    for (tls_ctx_entry **pp = &e->ctxs; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == id) {
            tls_ctx_entry *t = *pp;
            *pp = t->next;
            pthread_mutex_unlock(&e->ctx_lock);
            SSL_CTX_free(t->ctx); /* live SSL objects hold their own reference */
            free(t);
            return 0;
        }
    }
    pthread_mutex_unlock(&e->ctx_lock);
    return -1;
}

static SSL_CTX *ctx_ref(ambit_engine *e, int64_t id)
{
    SSL_CTX *out = NULL;
    pthread_mutex_lock(&e->ctx_lock);
    for (tls_ctx_entry *t = e->ctxs; t; t = t->next)
        if (t->id == id) {
            SSL_CTX_up_ref(t->ctx);
            out = t->ctx;
            break;
        }
    pthread_mutex_unlock(&e->ctx_lock);
    return out;
}

acmd *cmd_new(int kind)
{
    acmd *c = calloc(1, sizeof(*c));
    if (c) {
        c->kind = kind;
        c->fd = c->fd2 = -1;
    }
    return c;
}

static ambit_loop *loop_of(ambit_engine *e, uint64_t id) { return &e->loops[id % (uint64_t)e->nloops]; }

/* Shared entry checks: on failure the fds are closed here, since the caller gave them to us. */
static acmd *cmd_prepare(ambit_engine *e, int kind, int fd, int fd2, char *err, size_t errlen)
{
    const char *why = NULL;
    acmd *c = NULL;
    if (e->stopped)
        why = "engine stopped";
    else if ((fd >= 0 && set_nonblock(fd) < 0) || (fd2 >= 0 && set_nonblock(fd2) < 0))
        why = "bad file descriptor";
    else if (!(c = cmd_new(kind)))
        why = "out of memory";
    if (why) {
        set_err(err, errlen, why);
        if (fd >= 0)
            close(fd);
        if (fd2 >= 0)
            close(fd2);
        return NULL;
    }
    c->fd = fd;
    c->fd2 = fd2;
    if (fd >= 0)
        set_nodelay(fd);
    if (fd2 >= 0)
        set_nodelay(fd2);
    return c;
}

static int64_t post_conn(ambit_engine *e, int kind, int fd, int64_t ctx, const char *peer, uint64_t tag,
                         char *err, size_t errlen)
{
    acmd *c = cmd_prepare(e, kind, fd, -1, err, errlen);
    if (!c)
        return -1;
    c->ctx = ctx_ref(e, ctx);
    c->text = peer ? strdup(peer) : NULL;
    if (!c->ctx || (peer && !c->text)) {
        set_err(err, errlen, c->ctx ? "out of memory" : "unknown TLS context");
        cmd_free(c);
        return -1;
    }
    c->tag = tag;
    uint64_t id = c->id = engine_new_id(&e->next_id);
    loop_post(loop_of(e, id), c); /* the loop may run and free the command at once */
    return (int64_t)id;
}

int64_t ambit_connect_hbone(ambit_engine *e, int fd, int64_t ctx, const char *expected_peer, uint64_t tag,
                            char *err, size_t errlen)
{
    return post_conn(e, CMD_CONNECT, fd, ctx, expected_peer ? expected_peer : "", tag, err, errlen);
}

int64_t ambit_serve_hbone(ambit_engine *e, int fd, int64_t ctx, uint64_t tag, char *err, size_t errlen)
{
    return post_conn(e, CMD_SERVE, fd, ctx, NULL, tag, err, errlen);
}

int64_t ambit_open_stream(ambit_engine *e, uint64_t conn_id, const char *authority, const char *forwarded,
                          const char *extra, int local_fd, uint64_t tag, char *err, size_t errlen)
{
    acmd *c = cmd_prepare(e, CMD_OPEN_STREAM, local_fd, -1, err, errlen);
    if (!c)
        return -1;
    int with_fwd = forwarded && *forwarded;
    int with_extra = extra && *extra;
    if (!(c->text = strdup(authority ? authority : "")) || (with_fwd && !(c->text2 = strdup(forwarded))) ||
        (with_extra && !(c->text3 = strdup(extra)))) {
        set_err(err, errlen, "out of memory");
        cmd_free(c);
        return -1;
    }
    c->id = conn_id;
    uint64_t id = c->id2 = engine_new_id(&e->next_stream_id);
    c->tag = tag;
    loop_post(loop_of(e, conn_id), c);
    return (int64_t)id;
}

static int post_stream_cmd(ambit_engine *e, int kind, uint64_t conn_id, uint64_t stream_id, int fd, int status,
                           uint64_t tag, char *err, size_t errlen)
{
    acmd *c = cmd_prepare(e, kind, fd, -1, err, errlen);
    if (!c)
        return -1;
    c->id = conn_id;
    c->id2 = stream_id;
    c->status = status;
    c->tag = tag;
    loop_post(loop_of(e, conn_id), c);
    return 0;
}

int ambit_accept_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, int upstream_fd, uint64_t tag,
                        char *err, size_t errlen)
{
    return post_stream_cmd(e, CMD_ACCEPT, conn_id, stream_id, upstream_fd, 0, tag, err, errlen);
}

int ambit_reject_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, int status, char *err,
                        size_t errlen)
{
    if (status < 200 || status > 599) {
        set_err(err, errlen, "status must be 200..599");
        return -1;
    }
    return post_stream_cmd(e, CMD_REJECT, conn_id, stream_id, -1, status, 0, err, errlen);
}

int ambit_reset_stream(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, char *err, size_t errlen)
{
    return post_stream_cmd(e, CMD_RESET, conn_id, stream_id, -1, 0, 0, err, errlen);
}

int64_t ambit_splice(ambit_engine *e, int fd_a, int fd_b, uint64_t tag, char *err, size_t errlen)
{
    acmd *c = cmd_prepare(e, CMD_SPLICE, fd_a, fd_b, err, errlen);
    if (!c)
        return -1;
    uint64_t id = c->id = engine_new_id(&e->next_id);
    c->tag = tag;
    loop_post(loop_of(e, id), c);
    return (int64_t)id;
}

int ambit_close(ambit_engine *e, uint64_t conn_id, char *err, size_t errlen)
{
    return post_stream_cmd(e, CMD_CLOSE, conn_id, 0, -1, 0, 0, err, errlen);
}
