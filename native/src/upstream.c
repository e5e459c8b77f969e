/* Accepting a served stream once the engine's own connect to the destination pod succeeded: Python
 * decides (authorization, which source address the pod sees), the engine makes the socket, waits for the
 * connect on the stream's loop, answers 200 and pumps, or 503 when the connect fails. Before, Python made
 * the socket, watched the connect in its own loop and then handed it over: three wake-ups per stream. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif
#ifndef IPV6_TRANSPARENT
#define IPV6_TRANSPARENT 75
#endif

#define UPSTREAM_TIMEOUT_MS 10000 /* as the proxy's own connect timeout */

typedef struct upconn {
    aio io;
    uint64_t conn_id, stream_id, tag;
    uint64_t deadline_ms;
    fast_accept fast;        /* inbound fast path: what its event reports (entry 0: Python accepted it) */
    struct upconn *next;
} upconn;

static int addr_of(const char *ip, int port, struct sockaddr_storage *out, socklen_t *len)
{
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *a4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *len = sizeof(*a4);
        return AF_INET;
    }
    if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*a6);
        return AF_INET6;
    }
    return -1;
}

/* The client's own port when it is free here (no port search at all: the search through ports that
 * earlier connects of this address hold in TIME_WAIT grew to milliseconds per connect under a steady
 * connection rate), else one the kernel picks at connect. */
static int bind_source(int fd, struct sockaddr_storage *src, socklen_t slen, int port)
{
    if (port > 0 && port <= 65535) {
        if (src->ss_family == AF_INET)
            ((struct sockaddr_in *)src)->sin_port = htons((uint16_t)port);
        else
            ((struct sockaddr_in6 *)src)->sin6_port = htons((uint16_t)port);
        if (bind(fd, (struct sockaddr *)src, slen) == 0)
            return 0;
        if (errno != EADDRINUSE)
            return -1;
        if (src->ss_family == AF_INET)
            ((struct sockaddr_in *)src)->sin_port = 0;
        else
            ((struct sockaddr_in6 *)src)->sin6_port = 0;
    }
    return bind(fd, (struct sockaddr *)src, slen);
}

/* The socket a pod is reached with: marked (never captured again), from `source_ip` (IP_TRANSPARENT, the
 * client's address) when given, connect started. */
static int upstream_socket(const char *dst_ip, int dst_port, const char *source_ip, int source_port, int mark,
                           char *err, size_t errlen)
{
    struct sockaddr_storage dst, src;
    socklen_t dlen, slen;
    int family = addr_of(dst_ip, dst_port, &dst, &dlen);
    if (family < 0 || dst_port <= 0 || dst_port > 65535 ||
        (source_ip && addr_of(source_ip, 0, &src, &slen) != family)) {
        copy_str(err, errlen, "bad upstream address");
        return -1;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    const char *what = NULL;
    if (mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0)
        what = "SO_MARK";
    else if (source_ip && (family == AF_INET ? setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(one))
                                             : setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(one))) < 0)
        what = "IP_TRANSPARENT";
    /* The port comes at connect(), unique per 4-tuple, not at bind(): bind(ip, 0) reserves a port against
     * every destination and skips every port any earlier socket of that address still holds (TIME_WAIT
     * too), so the connects of one busy client address scanned an ever fuller range, then failed. */
    else if (source_ip && setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0) /* v6 too */
        what = "IP_BIND_ADDRESS_NO_PORT";
    else if (source_ip && bind_source(fd, &src, slen, source_port) < 0)
        what = "bind";
    else if (connect(fd, (struct sockaddr *)&dst, dlen) < 0 && errno != EINPROGRESS)
        what = "connect";
    if (what) {
        snprintf(err, errlen, "%s: %s", what, strerror(errno));
        close(fd);
        return -1;
    }
    set_nodelay(fd);
    return fd;
}

int ambit_accept_connect(ambit_engine *e, uint64_t conn_id, uint64_t stream_id, const char *dst_ip, int dst_port,
                         const char *source_ip, int mark, uint64_t tag, char *err, size_t errlen)
{
    struct sockaddr_storage probe;
    socklen_t len;
    const char *why = e->stopped ? "engine stopped"
                      : addr_of(dst_ip, dst_port, &probe, &len) < 0 || dst_port <= 0 || dst_port > 65535
                          ? "bad upstream address"
                          : NULL;
    acmd *c = why ? NULL : calloc(1, sizeof(*c));
    if (c && (!(c->text = strdup(dst_ip)) || (source_ip && *source_ip && !(c->text2 = strdup(source_ip))))) {
        free(c->text);
        free(c);
        c = NULL;
    }
    if (!c) {
        copy_str(err, errlen, why ? why : "out of memory");
        return -1;
    }
    /* The socket and its connect are made on the stream's loop: a connect to a local pod runs the whole
     * TCP handshake inside the syscall, which must not cost the caller (Python's loop). */
    c->kind = CMD_ACCEPT_CONNECT;
    c->id = conn_id;
    c->id2 = stream_id;
    c->fd = c->fd2 = -1;
    c->status = dst_port;
    c->aux = (uint64_t)(unsigned)mark;
    c->tag = tag;
    loop_post_cmd(e, conn_id, c);
    return 0;
}

static void unlink_up(ambit_loop *l, upconn *u)
{
    for (upconn **pp = &l->upconns; *pp; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            return;
        }
}

/* The inbound fast path's one event for the stream (fastpath_in.c accepted it without Python): when the
 * connect ended, so a stream that connects costs Python this event alone. `state` (bytes_out): 0 connected
 * and answered 200, 1 connect failed (upstream_failed follows). -1 when it cannot be queued: the caller
 * refuses the stream rather than serve it unseen, and the entry gets its credit back. */
static int fast_event(ambit_loop *l, uint64_t conn_id, uint64_t stream_id, uint64_t tag, const fast_accept *fa,
                      int state)
{
    ambit_event ev;
    event_init(&ev, AMBIT_EV_FAST_ACCEPT, conn_id, stream_id, tag);
    ev.bytes_in = fa->entry;
    ev.bytes_out = (uint64_t)state;
    ev.status = fa->port;
    copy_str(ev.traceparent, sizeof(ev.traceparent), fa->traceparent);
    if (event_emit(l->engine, &ev) < 0) {
        fastin_unseen(l->engine, fa->entry);
        return -1;
    }
    return 0;
}

static void refuse(ambit_loop *l, uint64_t conn_id, uint64_t stream_id, uint64_t tag, int error,
                   const char *detail, const fast_accept *fa)
{
    if (fa && fa->entry)
        fast_event(l, conn_id, stream_id, tag, fa, 1); /* unqueued: the 503 below is all that happens */
    ambit_event ev;
    event_init(&ev, AMBIT_EV_UPSTREAM_FAILED, conn_id, stream_id, tag);
    ev.status = error;
    copy_str(ev.detail, sizeof(ev.detail), detail);
    event_emit(l->engine, &ev); /* before the stream's end: Python records UF, as for its own connects */
    acmd r = {.kind = CMD_REJECT, .id = conn_id, .id2 = stream_id, .fd = -1, .fd2 = -1, .status = 503};
    hconn_reject(l, &r);
}

/* The connect ended: accept the stream with the socket (200), or refuse it 503 and say why first. */
static void finish(ambit_loop *l, upconn *u, int error)
{
    unlink_up(l, u);
    /* A connected socket stays registered: the stream takes its epoll entry over (one MOD, not DEL+ADD). */
    acmd c = {.kind = CMD_ACCEPT, .id = u->conn_id, .id2 = u->stream_id, .fd = u->io.fd, .fd2 = -1,
              .tag = u->tag, .fd_registered = 1};
    if (error || u->io.fd < 0)
        loop_del_fd(l, &u->io);
    if (error) {
        if (u->io.fd >= 0)
            close(u->io.fd);
        char detail[128];
        snprintf(detail, sizeof(detail), "connect: %s", strerror(error));
        refuse(l, u->conn_id, u->stream_id, u->tag, error, detail, &u->fast);
    } else if (u->fast.entry && fast_event(l, u->conn_id, u->stream_id, u->tag, &u->fast, 0) < 0) {
        loop_del_fd(l, &u->io); /* still registered (kept for the stream to take over) */
        close(c.fd);
        acmd r = {.kind = CMD_REJECT, .id = u->conn_id, .id2 = u->stream_id, .fd = -1, .fd2 = -1, .status = 503};
        hconn_reject(l, &r);
    } else {
        hconn_accept(l, &c);
        if (c.fd >= 0) { /* the stream ended (or was refused by Python) meanwhile */
            loop_del_fd(l, &u->io); /* close() alone may leave it registered (a forked child's copy) */
            close(c.fd);
            if (u->fast.entry) { /* its end event went out under the serve tag: Python's record ends here */
                ambit_event ev;
                event_init(&ev, AMBIT_EV_STREAM_CLOSED, u->conn_id, u->stream_id, u->tag);
                copy_str(ev.detail, sizeof(ev.detail), "connection closed");
                event_emit(l->engine, &ev);
            }
        } else if (!u->fast.entry) {
            ambit_event ev;
            event_init(&ev, AMBIT_EV_STREAM_ACCEPTED, u->conn_id, u->stream_id, u->tag);
            event_emit(l->engine, &ev);
        }
    }
    free(u);
}

static void on_upstream(ambit_loop *l, aio *io, uint32_t events)
{
    upconn *u = io->owner;
    if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
        return;
    /* A failed connect always raises EPOLLERR: writable without it is connected, no SO_ERROR to ask. */
    int error = 0;
    socklen_t len = sizeof(error);
    if ((events & (EPOLLERR | EPOLLHUP)) && getsockopt(io->fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0)
        error = errno;
    else if ((events & (EPOLLERR | EPOLLHUP)) && !error)
        error = ECONNREFUSED; /* hung up with the error already taken: the connect did not complete */
    finish(l, u, error);
}

void accept_connect_start(ambit_loop *l, acmd *c) { accept_connect_fast(l, c, NULL); }

void accept_connect_fast(ambit_loop *l, acmd *c, const fast_accept *fa)
{
    char err[160];
    int fd = upstream_socket(c->text, c->status, c->text2, fa ? fa->port : 0, (int)c->aux, err, sizeof(err));
    if (fd < 0) {
        refuse(l, c->id, c->id2, c->tag, EIO, err, fa);
        return;
    }
    upconn *u = calloc(1, sizeof(*u));
    if (!u) {
        close(fd);
        refuse(l, c->id, c->id2, c->tag, ENOMEM, "connect: out of memory", fa);
        return;
    }
    if (fa)
        u->fast = *fa;
    u->conn_id = c->id;
    u->stream_id = c->id2;
    u->tag = c->tag;
    u->deadline_ms = now_ms() + UPSTREAM_TIMEOUT_MS;
    u->io.on_event = on_upstream;
    u->io.owner = u;
    u->next = l->upconns;
    l->upconns = u;
    if (loop_add_fd(l, &u->io, fd) < 0) {
        int error = errno ? errno : EIO;
        close(fd);
        u->io.fd = -1;
        finish(l, u, error);
    }
}

/* Called by loop_main after an epoll batch, never inside one: finish() frees connects whose events that
 * batch may still hold. */
void accept_connect_tick(ambit_loop *l)
{
    uint64_t now = now_ms();
    for (upconn *u = l->upconns, *next; u; u = next) {
        next = u->next;
        if (now >= u->deadline_ms)
            finish(l, u, ETIMEDOUT);
    }
}

void accept_connect_destroy_all(ambit_loop *l)
{
    for (upconn *u = l->upconns, *next; u; u = next) {
        next = u->next;
        loop_del_fd(l, &u->io);
        close(u->io.fd);
        free(u);
    }
    l->upconns = NULL;
}
