/* Resetting a stream socket without losing what was already queued for it.
 *
 * A TCP peer that receives data and then a RST still reads that data (the kernel queues it ahead of the
 * error). close() with SO_LINGER 0 instead discards whatever the socket has not transmitted yet, so a
 * stream that ends with a reset right after its last DATA (a client that uploads and aborts, or a peer's
 * RST_STREAM following its DATA) would lose those bytes on a fresh, cwnd-limited connection. A lingering
 * socket keeps the bytes the stream had not written yet, writes them, waits until the peer acknowledged
 * everything (SIOCOUTQ 0), then resets. Acknowledged, not merely sent (SIOCOUTQNSD 0, as before): a
 * segment that was sent but lost on the way needs a retransmission, which the RST kills, and the reader
 * got the bytes up to the hole, then the reset (likely the stress test's rare losses of aborted
 * streams' bytes under load; tests/unit/native/engine_lossy.py drops segments on purpose). Bounded: after
 * AMBIT_LINGER_MS without progress (neither our buffer nor the kernel's queue shrank: the reader stopped
 * reading), reset regardless; the bytes kept are at most what the stream had buffered.
 *
 * The same holds for a stream that ended cleanly (END_STREAM both ways) while its socket still had bytes to
 * take, when its connection goes away before they are written (a peer that closes right after its last
 * stream, with or without GOAWAY): linger_close writes them, then closes normally (FIN). Giving up after
 * AMBIT_LINGER_MS resets instead, so a truncated stream never looks complete to the reader.
 *
 * And for a connection refused in its TLS handshake: its alert is written, but close() with unread input
 * (a TLS 1.3 client sends data right after its Finished) sends a RST that can destroy the alert at the
 * peer before it is read. linger_drain sends FIN after the alert and reads and discards what comes until
 * the peer closes, for at most AMBIT_DRAIN_MS / AMBIT_DRAIN_BYTES (not extended by progress), then closes. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <unistd.h>

#include "internal.h"

typedef struct alinger {
    aio io;
    abuf out;
    uint64_t deadline_ms;
    int done;
    int graceful;                 /* close with FIN once `out` is written (linger_close), else reset */
    int drain;                    /* linger_drain: read and discard until EOF, then close */
    size_t drained;
    int unsent;                   /* the kernel's untransmitted bytes last seen: shrinking is progress */
    struct alinger *next;
} alinger;

/* Bytes the peer has not acknowledged yet, sent or not (0 for sockets that are not TCP: their close keeps
 * the data). An ACK raises no edge-triggered event once the send buffer had room, so a wait for one is
 * seen by linger_tick. */
static int unsent(int fd)
{
    int n = 0;
    if (ioctl(fd, SIOCOUTQ, &n) < 0)
        return 0;
    return n;
}

/* 1 when the socket may be closed now (everything transmitted, or it failed: *failed), 0 to keep
 * waiting; *moved tells whether bytes left our buffer or the kernel's queue shrank since *last (a reader
 * that keeps reading, however slowly, gets everything). A graceful close needs only our buffer written: a
 * normal close() keeps what the kernel still queues. */
static int linger_progress(int fd, abuf *out, int graceful, int *last, int *moved, int *failed)
{
    while (abuf_pending(out)) {
        ssize_t n = write(fd, abuf_head(out), abuf_pending(out));
        if (n > 0) {
            abuf_consume(out, (size_t)n);
            *moved = 1;
        }
        else if (n < 0 && errno == EAGAIN) {
            return 0;
        }
        else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            *failed = 1;
            return 1; /* the socket failed: nothing more can be delivered */
        }
    }
    if (graceful)
        return 1;
    int now = unsent(fd);
    if (now < *last)
        *moved = 1;
    *last = now;
    return now == 0;
}

/* `complete`: everything was handed to the kernel (a graceful linger then ends with FIN). */
static void linger_end(ambit_loop *l, alinger *g, int complete)
{
    if (g->done)
        return;
    g->done = 1;
    loop_del_fd(l, &g->io);
    if ((g->graceful && complete) || g->drain)
        close(g->io.fd);
    else
        reset_close(g->io.fd);
    g->io.fd = -1;
    abuf_free(&g->out);
}

#define AMBIT_DRAIN_MS 1000
#define AMBIT_DRAIN_BYTES (1024 * 1024)

/* 1 once the peer closed (or failed, or sent too much), 0 while it may still send. */
static int drain_progress(alinger *g)
{
    char buf[16384];
    for (;;) {
        ssize_t n = read(g->io.fd, buf, sizeof(buf));
        if (n > 0) {
            g->drained += (size_t)n;
            if (g->drained >= AMBIT_DRAIN_BYTES)
                return 1;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            return !(n < 0 && errno == EAGAIN);
        }
    }
}

static void on_linger_io(ambit_loop *l, aio *io, uint32_t events)
{
    alinger *g = io->owner;
    if (g->done)
        return;
    if (g->drain) {
        if ((events & (EPOLLERR | EPOLLHUP)) || drain_progress(g))
            linger_end(l, g, 1);
        return;
    }
    int moved = 0, failed = 0;
    if (events & (EPOLLERR | EPOLLHUP))
        linger_end(l, g, 0);
    else if (linger_progress(io->fd, &g->out, g->graceful, &g->unsent, &moved, &failed))
        linger_end(l, g, !failed);
    else if (moved)
        g->deadline_ms = now_ms() + AMBIT_LINGER_MS; /* a reader making progress gets everything */
}

static void linger_start(ambit_loop *l, int fd, abuf *out, int graceful)
{
    int moved = 0, failed = 0, last = 1 << 30;
    if (linger_progress(fd, out, graceful, &last, &moved, &failed)) {
        if (graceful && !failed)
            close(fd);
        else
            reset_close(fd);
        abuf_free(out);
        return;
    }
    alinger *g = calloc(1, sizeof(*g));
    if (!g) {
        reset_close(fd);
        abuf_free(out);
        return;
    }
    g->out = *out;
    g->graceful = graceful;
    g->unsent = last;
    memset(out, 0, sizeof(*out));
    g->io.owner = g;
    g->io.on_event = on_linger_io;
    g->deadline_ms = now_ms() + AMBIT_LINGER_MS;
    if (loop_add_fd(l, &g->io, fd) < 0) {
        reset_close(fd);
        abuf_free(&g->out);
        free(g);
        return;
    }
    g->next = l->lingers;
    l->lingers = g;
    if (!graceful)
        ctr_add(l->engine, AMBIT_C_RESETS_LINGERED, 1);
}

void linger_drain(ambit_loop *l, int fd)
{
    shutdown(fd, SHUT_WR); /* FIN right after what was written (the alert) */
    alinger *g = calloc(1, sizeof(*g));
    if (!g) {
        close(fd);
        return;
    }
    g->drain = 1;
    g->io.owner = g;
    g->io.on_event = on_linger_io;
    g->deadline_ms = now_ms() + AMBIT_DRAIN_MS;
    if (loop_add_fd(l, &g->io, fd) < 0) {
        close(fd);
        free(g);
        return;
    }
    g->next = l->lingers;
    l->lingers = g;
}

void linger_reset(ambit_loop *l, int fd, abuf *out)
{
    linger_start(l, fd, out, 0);
}

void linger_close(ambit_loop *l, int fd, abuf *out)
{
    linger_start(l, fd, out, 1);
}

void linger_tick(ambit_loop *l)
{
    uint64_t now = now_ms();
    for (alinger *g = l->lingers; g; g = g->next) {
        int moved = 0, failed = 0;
        if (g->done)
            continue;
        if (g->drain) {
            if (now >= g->deadline_ms)
                linger_end(l, g, 1);
            continue;
        }
        if (linger_progress(g->io.fd, &g->out, g->graceful, &g->unsent, &moved, &failed))
            linger_end(l, g, !failed);
        else if (!moved && now >= g->deadline_ms)
            linger_end(l, g, 0);
        else if (moved)
            g->deadline_ms = now + AMBIT_LINGER_MS;
    }
}

/* Frees ended entries; runs after an epoll batch, so no event of this batch still points at one. */
void linger_reap(ambit_loop *l, int all)
{
    for (alinger **pp = &l->lingers; *pp;) {
        alinger *g = *pp;
        if (all)
            linger_end(l, g, 0);
        if (g->done) {
            *pp = g->next;
            free(g);
        } else {
            pp = &g->next;
        }
    }
}
