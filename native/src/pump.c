/* Plaintext pump between two sockets (inbound passthrough, 15006): splice(2) through a pipe per direction,
 * so payload bytes never enter user space. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

typedef struct pdir {
    int src, dst;
    int pipe[2];
    size_t inpipe, pipecap;
    int src_readable, dst_writable;
    int eof, shut;
    uint64_t bytes;
} pdir;

typedef struct apump {
    uint64_t id, tag;
    aio io_a, io_b;
    pdir ab, ba; /* ab: bytes read from fd_a, written to fd_b */
    int failed, done;
    char detail[128];
    struct apump *done_next;
} apump;

static int pdir_init(pdir *d, int src, int dst)
{
    d->src = src;
    d->dst = dst;
    if (pipe2(d->pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
        d->pipe[0] = d->pipe[1] = -1;
        return -1;
    }
    /* A bigger pipe means fewer splice calls per byte; the kernel may cap it (fs.pipe-max-size). */
    int cap = fcntl(d->pipe[1], F_SETPIPE_SZ, AMBIT_PIPE_SIZE);
    if (cap < 0)
        cap = fcntl(d->pipe[1], F_GETPIPE_SZ);
    d->pipecap = cap > 0 ? (size_t)cap : 65536;
    return 0;
}

static void pdir_close_pipe(pdir *d)
{
    if (d->pipe[0] >= 0)
        close(d->pipe[0]);
    if (d->pipe[1] >= 0)
        close(d->pipe[1]);
    d->pipe[0] = d->pipe[1] = -1;
}

/* Moves bytes until both ends would block; returns -1 when reading the source failed, -2 when writing the
 * destination failed (errno set), so the splice's detail names the socket at fault. */
static int pdir_run(pdir *d)
{
    const unsigned fl = SPLICE_F_NONBLOCK | SPLICE_F_MOVE;
    for (;;) {
        int progress = 0;
        if (!d->eof && d->src_readable && d->inpipe < d->pipecap) {
            ssize_t n = splice(d->src, NULL, d->pipe[1], NULL, d->pipecap - d->inpipe, fl);
            if (n > 0) {
                d->inpipe += (size_t)n;
                progress = 1;
            } else if (n == 0) {
                d->eof = 1;
            } else if (errno == EAGAIN) {
                d->src_readable = 0;
            } else if (errno != EINTR) {
                return -1;
            }
        }
        if (d->inpipe && d->dst_writable) {
            ssize_t n = splice(d->pipe[0], NULL, d->dst, NULL, d->inpipe, fl);
            if (n > 0) {
                d->inpipe -= (size_t)n;
                d->bytes += (uint64_t)n;
                progress = 1;
            } else if (n < 0 && errno == EAGAIN) {
                d->dst_writable = 0;
            } else if (n < 0 && errno != EINTR) {
                return -2;
            }
        }
        if (!progress)
            break;
    }
    /* Half-close: the reader saw EOF and everything before it is written, so forward the FIN. */
    if (d->eof && !d->inpipe && !d->shut) {
        shutdown(d->dst, SHUT_WR);
        d->shut = 1;
    }
    return 0;
}

/* flows.c: the live counts and state of splice item->conn_id, on the loop that owns it. */
int pump_flow_stats(ambit_loop *l, ambit_flow_stats *item)
{
    apump *p = amap_get(&l->splices, item->conn_id);
    if (!p)
        return 0;
    item->bytes_in = p->ab.bytes;
    item->bytes_out = p->ba.bytes;
    if (p->failed || p->done || (p->ab.eof && p->ba.eof))
        item->state = AMBIT_FLOW_CLOSING;
    else
        item->state = p->ab.eof || p->ba.eof ? AMBIT_FLOW_HALF_CLOSED : AMBIT_FLOW_OPEN;
    return 1;
}

static void pump_free(ambit_loop *l, apump *p, int emit)
{
    amap_del(&l->splices, p->id);
    loop_del_fd(l, &p->io_a);
    loop_del_fd(l, &p->io_b);
    if (p->failed) {
        reset_close(p->io_a.fd);
        reset_close(p->io_b.fd);
    } else {
        close(p->io_a.fd);
        close(p->io_b.fd);
    }
    pdir_close_pipe(&p->ab);
    pdir_close_pipe(&p->ba);
    ambit_engine *e = l->engine;
    ctr_add(e, AMBIT_C_SPLICES_CLOSED, 1);
    ctr_add(e, AMBIT_C_SPLICES_ACTIVE, -1);
    if (emit) {
        ambit_event ev;
        event_init(&ev, AMBIT_EV_SPLICE_CLOSED, p->id, 0, p->tag);
        ev.bytes_in = p->ab.bytes;
        ev.bytes_out = p->ba.bytes;
        copy_str(ev.detail, sizeof(ev.detail), p->detail);
        event_emit(e, &ev);
    }
    free(p);
}

/* Freed after the current epoll batch: the batch may still hold an event for the other fd of the pair. */
static void pump_finish(ambit_loop *l, apump *p)
{
    if (p->done)
        return;
    p->done = 1;
    loop_del_fd(l, &p->io_a);
    loop_del_fd(l, &p->io_b);
    p->done_next = l->pumps_done;
    l->pumps_done = p;
}

void pump_process_pending(ambit_loop *l)
{
    while (l->pumps_done) {
        apump *p = l->pumps_done;
        l->pumps_done = p->done_next;
        pump_free(l, p, 1);
    }
}

static void pump_fail(apump *p, const char *what)
{
    p->failed = 1;
    snprintf(p->detail, sizeof(p->detail), "%s: %s", what, strerror(errno));
}

static void on_pump_event(ambit_loop *l, aio *io, uint32_t events)
{
    apump *p = io->owner;
    if (p->done)
        return;
    int is_a = io == &p->io_a;
    pdir *out = is_a ? &p->ab : &p->ba; /* direction this fd feeds */
    pdir *in = is_a ? &p->ba : &p->ab;  /* direction that writes into this fd */
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        out->src_readable = 1;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        in->dst_writable = 1;
    uint64_t before = p->ab.bytes + p->ba.bytes;
    /* detail "a: <error>" or "b: <error>": the socket that failed (fd_a is the client's) */
    int rv = pdir_run(&p->ab);
    if (rv < 0)
        pump_fail(p, rv == -1 ? "a" : "b");
    else if ((rv = pdir_run(&p->ba)) < 0)
        pump_fail(p, rv == -1 ? "b" : "a");
    ctr_add(l->engine, AMBIT_C_SPLICE_BYTES, (int64_t)(p->ab.bytes + p->ba.bytes - before));
    if (p->failed) {
        ctr_add(l->engine, AMBIT_C_ERRORS_IO, 1);
        pump_finish(l, p);
    } else if (p->ab.shut && p->ba.shut) {
        pump_finish(l, p);
    }
}

void pump_start(ambit_loop *l, acmd *c)
{
    apump *p = calloc(1, sizeof(*p));
    if (!p)
        goto fail;
    p->id = c->id;
    p->tag = c->tag;
    p->io_a.owner = p->io_b.owner = p;
    p->io_a.on_event = p->io_b.on_event = on_pump_event;
    p->io_a.fd = p->io_b.fd = -1;
    p->ab.pipe[0] = p->ab.pipe[1] = p->ba.pipe[0] = p->ba.pipe[1] = -1;
    if (pdir_init(&p->ab, c->fd, c->fd2) < 0 || pdir_init(&p->ba, c->fd2, c->fd) < 0)
        goto fail;
    if (amap_put(&l->splices, p->id, p) < 0)
        goto fail;
    p->io_a.fd = c->fd;
    p->io_b.fd = c->fd2;
    c->fd = c->fd2 = -1;
    ctr_add(l->engine, AMBIT_C_SPLICES_OPENED, 1);
    ctr_add(l->engine, AMBIT_C_SPLICES_ACTIVE, 1);
    if (loop_add_fd(l, &p->io_a, p->io_a.fd) < 0 || loop_add_fd(l, &p->io_b, p->io_b.fd) < 0) {
        pump_fail(p, "epoll");
        pump_finish(l, p);
    }
    return;
fail:
    if (p) {
        pdir_close_pipe(&p->ab);
        pdir_close_pipe(&p->ba);
        free(p);
    }
    ambit_event ev;
    event_init(&ev, AMBIT_EV_SPLICE_CLOSED, c->id, 0, c->tag);
    snprintf(ev.detail, sizeof(ev.detail), "cannot start splice: %s", strerror(errno));
    ctr_add(l->engine, AMBIT_C_ERRORS_IO, 1);
    event_emit(l->engine, &ev);
}

int pump_close_cmd(ambit_loop *l, uint64_t id)
{
    apump *p = amap_get(&l->splices, id);
    if (!p)
        return 0;
    if (!p->done)
        copy_str(p->detail, sizeof(p->detail), "closed by agent");
    pump_finish(l, p);
    return 1;
}

void pump_destroy_all(ambit_loop *l)
{
    pump_process_pending(l);
    apump *p;
    while ((p = amap_any(&l->splices)))
        pump_free(l, p, 0);
}
