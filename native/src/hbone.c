/* HBONE connections: mTLS (OpenSSL, non-blocking) carrying HTTP/2 CONNECT streams (nghttp2), each stream
 * bound to one TCP socket. Flow control is manual: received DATA is only acknowledged (WINDOW_UPDATE)
 * once written to the stream's socket, and a socket is only read while its stream buffer has room, so a
 * slow reader on either side throttles the sender (RFC 9113 section 5.2). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>

#include "internal.h"

#define STREAM_INBUF_FIRST (16 * 1024) /* first socket read of a stream; the buffer doubles from there */
#define READY_ROUNDS 64 /* bound on pending work per loop turn, so epoll is polled fairly */

enum { HS_TLS, HS_H2, HS_DONE };
enum { END_NONE, END_GRACEFUL, END_ERROR };

typedef struct hstream {
    uint64_t id, tag;
    int32_t h2id;
    struct hconn *conn;
    struct hstream *prev, *next;  /* the connection's streams */
    struct hstream *ready_next;
    int on_ready;
    aio io;                       /* fd -1 until a socket is attached */
    abuf in;                      /* socket -> peer */
    abuf out;                     /* peer -> socket */
    size_t unconsumed;            /* bytes written to the socket, not yet acknowledged to nghttp2 */
    int readable, writable;
    int rdhup;                    /* the socket reported EOF/hang-up: read until read() says 0 */
    int tcp_eof, peer_eof, shut_wr, tcp_failed, local_reset, deferred;
    int wr_dead;                  /* a write to the socket failed: what it still holds is read first */
    int rst_pending;              /* the socket failed: RST_STREAM once the bytes read from it are sent */
    struct hstream *req_next;     /* server: on the connection's list of requests not yet announced */
    int announced;                /* server: stream_request emitted, Python's answer pending or given */
    int quiet;                    /* server: reset before it was announced: counted, no event */
    int peer_counted;             /* server: holds one of its peer identity's stream slots (limits.c) */
    int h2_closed;
    uint32_t h2_error;
    int is_connect;
    int status;                   /* client: response :status; server: status we answered */
    int opened;                   /* client: 2xx received; server: accepted */
    int rejected;                 /* server: RST_STREAM(NO_ERROR) follows the response once it is sent */
    char *authority;
    char *forwarded;              /* client: header sent; server: header received (NULL when absent) */
    int forwarded_bad;            /* server: repeated or too long: reported as FORWARDED_INVALID */
    char *baggage, *traceparent;  /* server: telemetry headers received (NULL when absent, repeated, long) */
    int baggage_bad, traceparent_bad;
    uint64_t bytes_in, bytes_out;
} hstream;

/* What stream_request carries for a forwarded header that cannot be one valid value: no RFC 7239
 * element starts with a space, so the proxy's strict parser rejects it (a truncated value might not be). */
#define FORWARDED_INVALID " invalid (repeated or too long)"


typedef struct hconn {
    uint64_t id, tag;
    ambit_loop *l;
    aio io;
    SSL *ssl;
    BIO *wbio;                    /* buffer BIO in front of the socket, owned by ssl */
    nghttp2_session *h2;
    int server;
    int state;
    int readable, writable;
    int rdhup;                    /* the socket reported EOF/hang-up: read until OpenSSL sees it */
    int sock_drained;             /* OpenSSL's last socket read returned less than it asked for */
    char *expected_peer;
    char peer_id[512];
    abuf wbuf;
    hstream *streams;
    hstream *reqs, *reqs_tail;    /* server: requests of this read batch, announced once it is parsed */
    struct hconn *dirty_next;
    int on_dirty;
    int ending;                   /* END_*: set anywhere, acted on in conn_service */
    int err_counter;
    int closing, goaway_recv, tearing_down;
    char error[640];
    size_t conn_unconsumed;
    size_t in_total;              /* socket->peer bytes buffered over all streams (AMBIT_L_CONN_BUFFER) */
    int in_starved;               /* a stream stopped reading on in_total: wake them when it drains */
    uint64_t src_key, peer_key;   /* server: limits.c accounting keys */
    tls_verdict verdict;          /* server: the verify callback's verdict on the client leaf (tls.c) */
    int hs_counted;               /* server: counted as a pending handshake */
    int wbio_big;                 /* the write buffer BIO was grown after the handshake */
    uint64_t reset_window_ms;     /* start of the current one-second reset budget window */
    uint32_t resets_in_window;
    uint64_t bytes_in, bytes_out;
    uint64_t started_ms, last_rx_ms, ping_sent_ms;
} hconn;

static void mark_dirty(hconn *c)
{
    if (c->on_dirty || c->tearing_down)
        return;
    c->on_dirty = 1;
    c->dirty_next = c->l->dirty;
    c->l->dirty = c;
}

static void mark_ready(hstream *s)
{
    if (s->on_ready || s->conn->tearing_down)
        return;
    s->on_ready = 1;
    s->ready_next = s->conn->l->ready;
    s->conn->l->ready = s;
}

/* Records the first failure; the connection ends at the next conn_service (never inside callbacks). */
static void conn_fail(hconn *c, int counter, const char *fmt, const char *arg)
{
    if (c->ending == END_ERROR)
        return;
    c->ending = END_ERROR;
    c->err_counter = counter;
    snprintf(c->error, sizeof(c->error), fmt, arg ? arg : "");
    mark_dirty(c);
}

/* ---- streams ---- */

static hstream *stream_new(hconn *c, uint64_t id, uint64_t tag)
{
    hstream *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    if (amap_put(&c->l->streams, id, s) < 0) {
        free(s);
        return NULL;
    }
    s->id = id;
    s->tag = tag;
    s->conn = c;
    s->io.fd = -1;
    s->io.owner = s;
    s->next = c->streams;
    if (c->streams)
        c->streams->prev = s;
    c->streams = s;
    ctr_add(c->l->engine, AMBIT_C_STREAMS_OPENED, 1);
    ctr_add(c->l->engine, AMBIT_C_STREAMS_ACTIVE, 1);
    return s;
}

static void stream_emit_end(hstream *s, const char *detail)
{
    hconn *c = s->conn;
    int refused = !c->server && !s->opened;
    ambit_event ev;
    event_init(&ev, refused ? AMBIT_EV_STREAM_REFUSED : AMBIT_EV_STREAM_CLOSED, c->id, s->id, s->tag);
    ev.status = s->status;
    ev.bytes_in = s->bytes_in;
    ev.bytes_out = s->bytes_out;
    copy_str(ev.authority, sizeof(ev.authority), s->authority);
    copy_str(ev.detail, sizeof(ev.detail), detail);
    if (refused)
        ctr_add(c->l->engine, AMBIT_C_STREAMS_REFUSED, 1);
    event_emit(c->l->engine, &ev); /* counters first: Python may read them as soon as it sees the event */
}

static void stream_finish(hstream *s, const char *detail)
{
    hconn *c = s->conn;
    ambit_engine *e = c->l->engine;
    if (s->on_ready)
        for (hstream **pp = &c->l->ready; *pp; pp = &(*pp)->ready_next)
            if (*pp == s) {
                *pp = s->ready_next;
                break;
            }
    int reset = s->tcp_failed || s->local_reset || s->h2_error != NGHTTP2_NO_ERROR || !s->h2_closed;
    if (!detail)
        detail = s->local_reset  ? "reset by agent"
                 : s->tcp_failed ? "socket error"
                 : s->h2_error   ? "reset by peer"
                 : !c->server && !s->opened ? "refused by peer"
                                            : "";
    if (s->io.fd >= 0) {
        loop_del_fd(c->l, &s->io);
        if (reset && !s->tcp_failed && !s->local_reset)
            linger_reset(c->l, s->io.fd, &s->out); /* the peer's last bytes still reach the socket */
        else if (reset)
            reset_close(s->io.fd);
        else if (abuf_pending(&s->out))
            linger_close(c->l, s->io.fd, &s->out); /* ended cleanly, its connection gone: deliver the rest */
        else
            close(s->io.fd);
        s->io.fd = -1;
    }
    if (reset)
        ctr_add(e, AMBIT_C_STREAMS_RESET, 1);
    ctr_add(e, AMBIT_C_STREAMS_CLOSED, 1);
    ctr_add(e, AMBIT_C_STREAMS_ACTIVE, -1);
    if (s->tag & AMBIT_FAST_TAG_BIT)
        fastpath_stream_done(e, c->id);
    if (!s->quiet)
        stream_emit_end(s, detail);
    if (s->peer_counted)
        limits_stream_end(e, c->peer_key);
    c->in_total -= abuf_pending(&s->in);
    /* nghttp2 must never call back with a freed stream: also when it was closed here before nghttp2 closed it
     * (a request whose socket could not be attached: its HEADERS are still queued, then cancelled). */
    if (s->h2id > 0 && c->h2)
        nghttp2_session_set_stream_user_data(c->h2, s->h2id, NULL);
    if (s->prev)
        s->prev->next = s->next;
    else
        c->streams = s->next;
    if (s->next)
        s->next->prev = s->prev;
    amap_del(&c->l->streams, s->id);
    abuf_free(&s->in);
    abuf_free(&s->out);
    free(s->authority);
    free(s->forwarded);
    free(s->baggage);
    free(s->traceparent);
    free(s);
    mark_dirty(c);
}

/* flows.c: the live counts and state of stream item->stream_id, on the loop that owns it. */
int hconn_flow_stats(ambit_loop *l, ambit_flow_stats *item)
{
    hstream *s = amap_get(&l->streams, item->stream_id);
    if (!s || s->conn->id != item->conn_id)
        return 0;
    item->bytes_in = s->bytes_in;
    item->bytes_out = s->bytes_out;
    if (!s->opened)
        item->state = AMBIT_FLOW_CONNECTING;
    else if (s->local_reset || s->tcp_failed || s->rst_pending || s->wr_dead || s->h2_error ||
             (s->tcp_eof && s->peer_eof))
        item->state = AMBIT_FLOW_CLOSING;
    else
        item->state = s->tcp_eof || s->peer_eof ? AMBIT_FLOW_HALF_CLOSED : AMBIT_FLOW_OPEN;
    return 1;
}

static int stream_sending(const hstream *s)
{
    return s->h2id > 0 && !s->h2_closed && (!s->conn->server || s->opened);
}

/* The socket failed (e.g. the client reset it right after its last bytes). What was already read from it
 * still goes to the peer, as a TCP receiver reads queued data before the reset; then RST_STREAM. */
static void stream_tcp_fail(hstream *s)
{
    hconn *c = s->conn;
    s->tcp_failed = 1;
    if (stream_sending(s) && abuf_pending(&s->in) && !s->rst_pending) {
        s->rst_pending = 1;
        if (s->deferred) {
            s->deferred = 0;
            nghttp2_session_resume_data(c->h2, s->h2id);
        }
    } else if (!s->h2_closed && s->h2id > 0 && !s->rst_pending) {
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, s->h2id, NGHTTP2_CANCEL);
    }
    mark_dirty(c);
}

/* The last byte read before the socket failed went out as DATA: now the reset. */
static void stream_rst_if_sent(hstream *s)
{
    if (s->rst_pending == 1 && !abuf_pending(&s->in)) {
        s->rst_pending = 2;
        if (!s->h2_closed)
            nghttp2_submit_rst_stream(s->conn->h2, NGHTTP2_FLAG_NONE, s->h2id, NGHTTP2_CANCEL);
        mark_dirty(s->conn);
    }
}

static void stream_ack(hstream *s, size_t n)
{
    hconn *c = s->conn;
    nghttp2_session_consume(c->h2, s->h2id, n);
    ctr_add(c->l->engine, AMBIT_C_STREAM_BYTES_IN, (int64_t)n);
    mark_dirty(c);
}

/* Writing failed (the client reset the socket): bytes it sent before the reset are still queued in the
 * socket and go to the peer first, so read on until the error shows up on the read side too. */
static void stream_write_failed(hstream *s)
{
    s->wr_dead = 1;
    if (abuf_pending(&s->out)) {
        stream_ack(s, abuf_pending(&s->out)); /* dropped: nobody can receive it */
        abuf_free(&s->out);
    }
    if (!stream_sending(s) || s->tcp_eof)
        stream_tcp_fail(s);
    else
        s->readable = s->rdhup = 1;
}

/* Socket side of a stream: write what the peer sent, forward EOF, read while the buffer has room. */
static void stream_service(hstream *s)
{
    hconn *c = s->conn;
    if (s->unconsumed) {
        stream_ack(s, s->unconsumed);
        s->unconsumed = 0;
    }
    int fd = s->io.fd;
    if (fd >= 0 && !s->tcp_failed) {
        while (abuf_pending(&s->out) && s->writable && !s->wr_dead) {
            ssize_t n = write(fd, abuf_head(&s->out), abuf_pending(&s->out));
            if (n > 0) {
                abuf_consume(&s->out, (size_t)n);
                stream_ack(s, (size_t)n);
            } else if (n < 0 && errno == EAGAIN) {
                s->writable = 0;
            } else if (n < 0 && errno != EINTR) {
                stream_write_failed(s);
                break;
            }
        }
        if (!s->tcp_failed && !s->wr_dead && s->peer_eof && !abuf_pending(&s->out) && !s->shut_wr) {
            shutdown(fd, SHUT_WR);
            s->shut_wr = 1;
        }
        int sending = stream_sending(s);
        int got = 0;
        ambit_engine *e = c->l->engine;
        size_t cap = (size_t)__atomic_load_n(&e->limits[AMBIT_L_STREAM_BUFFER], __ATOMIC_RELAXED);
        size_t conn_cap = (size_t)__atomic_load_n(&e->limits[AMBIT_L_CONN_BUFFER], __ATOMIC_RELAXED);
        while (!s->tcp_failed && sending && s->readable && !s->tcp_eof && abuf_pending(&s->in) < cap) {
            /* A peer that stops granting window pins at most cap per stream and conn_cap per connection. */
            if (conn_cap && c->in_total >= conn_cap) {
                c->in_starved = 1;
                break;
            }
            size_t room = cap - abuf_pending(&s->in);
            if (conn_cap && room > conn_cap - c->in_total)
                room = conn_cap - c->in_total;
            /* The buffer grows read by read (16 KiB, then doubling up to the cap), not to its cap at the
             * first read: 128 KiB per new stream was an mmap (glibc's M_MMAP_THRESHOLD) and a munmap with a
             * TLB shootdown when it ended, for a request of a few bytes. */
            size_t step = s->in.cap ? s->in.cap * 2 : STREAM_INBUF_FIRST;
            if (room > step)
                room = step;
            if (abuf_reserve(&s->in, room) < 0) {
                stream_tcp_fail(s);
                break;
            }
            ssize_t n = read(fd, s->in.data + s->in.len, room);
            if (n > 0) {
                s->in.len += (size_t)n;
                c->in_total += (size_t)n;
                got = 1;
                /* A short read drained the socket; edge-triggered epoll reports the next bytes, so skip
                 * the read() that would only say EAGAIN (one syscall per message per hop). Not once a
                 * hang-up was reported: that edge is gone and the EOF must still be read. */
                if ((size_t)n < room && !s->rdhup)
                    s->readable = 0;
            } else if (n == 0 && s->wr_dead) {
                stream_tcp_fail(s);
            } else if (n == 0) {
                s->tcp_eof = 1;
                got = 1;
            } else if (errno == EAGAIN) {
                s->readable = 0;
            } else if (errno != EINTR) {
                stream_tcp_fail(s);
            }
        }
        if (got && s->deferred) {
            s->deferred = 0;
            nghttp2_session_resume_data(c->h2, s->h2id);
        }
        if (got)
            mark_dirty(c);
    }
    int drained = s->io.fd < 0 || s->tcp_failed || s->wr_dead || s->h2_error || !abuf_pending(&s->out);
    /* Reset by the peer while Python decides: kept (with the bytes it sent) until accept or reject, so an
     * upload followed by a reset still reaches the pod, as it would over TCP. */
    int awaiting = c->server && s->announced && !s->opened && !s->status && !s->local_reset && !c->tearing_down;
    if (s->h2_closed && drained && !awaiting)
        stream_finish(s, NULL);
}

static void on_stream_io(ambit_loop *l, aio *io, uint32_t events)
{
    (void)l;
    hstream *s = io->owner;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        s->readable = 1;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        s->rdhup = 1;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        s->writable = 1;
    mark_ready(s);
}

/* The socket is taken as writable (a new stream's socket has an empty send queue; EAGAIN clears it) and,
 * when `readable`, read at once: a client's first bytes usually wait in the socket already, and read
 * before the connection flushes they leave in the same TLS record as the CONNECT HEADERS (one write and
 * one packet per new connection less; the epoll event for them would come only after that flush). A
 * socket with nothing yet costs one read() that says EAGAIN; registration comes first, so bytes arriving
 * after that read raise an edge. */
static int stream_attach(hstream *s, acmd *cmd, int readable)
{
    ambit_loop *l = s->conn->l;
    s->io.on_event = on_stream_io;
    if ((cmd->fd_registered ? loop_move_fd(l, &s->io, cmd->fd) : loop_add_fd(l, &s->io, cmd->fd)) < 0) {
        s->io.fd = -1; /* not taken: the caller still owns (and closes) the fd, stream_finish must not */
        return -1;
    }
    cmd->fd = -1;
    s->writable = 1;
    s->readable = readable;
    mark_ready(s);
    return 0;
}

/* nghttp2 asks how much DATA to send; the bytes themselves are copied once, by on_send_data (NO_COPY). */
static ssize_t stream_read_cb(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                              uint32_t *data_flags, nghttp2_data_source *source, void *user_data)
{
    (void)session, (void)stream_id, (void)buf, (void)user_data;
    hstream *s = source->ptr;
    size_t avail = abuf_pending(&s->in);
    size_t n = avail < length ? avail : length;
    if (n == avail && s->tcp_eof && !s->rst_pending)
        *data_flags |= NGHTTP2_DATA_FLAG_EOF; /* the socket's FIN becomes END_STREAM */
    else if (!n) {
        s->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    if (n)
        *data_flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    return (ssize_t)n;
}

/* Runs right after stream_read_cb within the same nghttp2_session_send, so the stream is alive. It never
 * returns WOULDBLOCK (a retry could come after the stream is gone); wbuf may exceed its mark by a frame. */
static int on_send_data(nghttp2_session *session, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                        nghttp2_data_source *source, void *user_data)
{
    (void)session, (void)frame;
    hconn *c = user_data;
    hstream *s = source->ptr;
    if (abuf_reserve(&c->wbuf, 9 + length) < 0 || length > abuf_pending(&s->in))
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    abuf_append(&c->wbuf, framehd, 9);
    abuf_append(&c->wbuf, abuf_head(&s->in), length);
    abuf_consume(&s->in, length);
    c->in_total -= length;
    if (c->in_starved) { /* budget freed: the streams that stopped on it read again */
        c->in_starved = 0;
        for (hstream *o = c->streams; o; o = o->next)
            if (o->readable && !o->tcp_eof && o != s)
                mark_ready(o);
    }
    s->bytes_out += length;
    ctr_add(c->l->engine, AMBIT_C_STREAM_BYTES_OUT, (int64_t)length);
    if (s->rst_pending)
        stream_rst_if_sent(s);
    else if (s->readable && !s->tcp_eof)
        mark_ready(s);
    return 0;
}

/* ---- nghttp2 callbacks ---- */

static ssize_t on_send(nghttp2_session *session, const uint8_t *data, size_t length, int flags, void *user_data)
{
    (void)session, (void)flags;
    hconn *c = user_data;
    if (abuf_pending(&c->wbuf) >= AMBIT_WBUF_HIGH)
        return NGHTTP2_ERR_WOULDBLOCK;
    if (abuf_append(&c->wbuf, data, length) < 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)length;
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    hconn *c = user_data;
    if (!c->server || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    ambit_engine *e = c->l->engine;
    if (!limits_stream_start(e, c->peer_key)) {
        /* This peer identity holds its share of streams (over all its connections): refuse only this one. */
        ctr_add(e, AMBIT_C_REFUSED_STREAMS_PEER, 1);
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_REFUSED_STREAM);
        return 0;
    }
    hstream *s = stream_new(c, engine_new_id(&e->next_stream_id), c->tag);
    if (!s) {
        limits_stream_end(e, c->peer_key);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* nghttp2 resets this stream only */
    }
    s->peer_counted = 1;
    s->h2id = frame->hd.stream_id;
    nghttp2_session_set_stream_user_data(session, s->h2id, s);
    return 0;
}

/* Telemetry headers: the first value, bounded; a repeated or oversized one is dropped (never truncated). */
static void keep_once(char **slot, int *bad, const uint8_t *value, size_t len, size_t cap)
{
    if (*slot || *bad || len >= cap) {
        free(*slot);
        *slot = NULL;
        *bad = 1;
        return;
    }
    *slot = strndup((const char *)value, len);
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data)
{
    (void)flags, (void)user_data;
    hstream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (!s || frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    if (namelen == 7 && !memcmp(name, ":method", 7))
        s->is_connect = valuelen == 7 && !memcmp(value, "CONNECT", 7);
    else if (namelen == 10 && !memcmp(name, ":authority", 10) && !s->authority && valuelen < AMBIT_HEADER_MAX)
        s->authority = strndup((const char *)value, valuelen);
    else if (namelen == 9 && !memcmp(name, "forwarded", 9) && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        /* Kept raw and bounded; Python parses it. A second field line or an oversized one is never
         * combined or truncated (either could turn into a different valid claim). */
        if (s->forwarded || s->forwarded_bad || valuelen >= AMBIT_HEADER_MAX) {
            free(s->forwarded);
            s->forwarded = NULL;
            s->forwarded_bad = 1;
        } else if (!(s->forwarded = strndup((const char *)value, valuelen))) {
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
    }
    else if (namelen == 7 && !memcmp(name, "baggage", 7) && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
        keep_once(&s->baggage, &s->baggage_bad, value, valuelen, sizeof(((ambit_event *)0)->baggage));
    else if (namelen == 11 && !memcmp(name, "traceparent", 11) && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
        keep_once(&s->traceparent, &s->traceparent_bad, value, valuelen,
                  sizeof(((ambit_event *)0)->traceparent));
    else if (namelen == 7 && !memcmp(name, ":status", 7) && valuelen == 3)
        s->status = (value[0] - '0') * 100 + (value[1] - '0') * 10 + (value[2] - '0');
    return 0;
}

static void server_request(hconn *c, hstream *s)
{
    if (!s->is_connect || !s->authority || c->closing) {
        /* Only CONNECT tunnels are served here (RFC 9113 8.5); answer other methods and finish. */
        nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)(c->closing ? "503" : "405"), 7, 3,
                         NGHTTP2_NV_FLAG_NONE};
        s->status = c->closing ? 503 : 405;
        s->rejected = 1;
        nghttp2_submit_response(c->h2, s->h2id, &nv, 1, NULL);
        return;
    }
    /* Announced once the whole read batch is parsed: a stream the peer reset within the same batch (rapid
     * reset: HEADERS then RST_STREAM) never costs Python an event. */
    s->req_next = NULL;
    if (c->reqs_tail)
        c->reqs_tail->req_next = s;
    else
        c->reqs = s;
    c->reqs_tail = s;
}

/* Emits stream_request for the requests of the batch just parsed; the ones already reset without sending
 * a byte are counted (streams_reset_early) and dropped without any event. */
static void announce_requests(hconn *c)
{
    hstream *s = c->reqs;
    c->reqs = c->reqs_tail = NULL;
    for (hstream *next; s; s = next) {
        next = s->req_next;
        if (s->h2_closed && !s->bytes_in) { /* with bytes it is announced: its upload must arrive */
            s->quiet = 1;
            ctr_add(c->l->engine, AMBIT_C_STREAMS_RESET_EARLY, 1);
            mark_ready(s);
            continue;
        }
        s->announced = 1;
        /* An entry Python installed for exactly these inputs accepts it here (fastpath_in.c). */
        if (fastin_try(c->l, c->id, s->id, s->authority, s->forwarded, s->forwarded_bad, s->traceparent))
            continue;
        ambit_event ev;
        event_init(&ev, AMBIT_EV_STREAM_REQUEST, c->id, s->id, c->tag);
        copy_str(ev.authority, sizeof(ev.authority), s->authority);
        copy_str(ev.forwarded, sizeof(ev.forwarded), s->forwarded_bad ? FORWARDED_INVALID : s->forwarded);
        copy_str(ev.peer_id, sizeof(ev.peer_id), c->peer_id);
        copy_str(ev.baggage, sizeof(ev.baggage), s->baggage);
        copy_str(ev.traceparent, sizeof(ev.traceparent), s->traceparent);
        event_emit(c->l->engine, &ev);
    }
}

/* Rapid reset (CVE-2023-44487): each peer reset costs us a stream's setup, so a peer may cause at most
 * AMBIT_L_RESETS_PER_S per second: over all connections of one authenticated identity when serving, per
 * connection otherwise; beyond, GOAWAY(ENHANCE_YOUR_CALM) and the connection ends. */
static void conn_count_reset(hconn *c)
{
    ambit_engine *e = c->l->engine;
    uint32_t budget = (uint32_t)__atomic_load_n(&e->limits[AMBIT_L_RESETS_PER_S], __ATOMIC_RELAXED);
    uint64_t now = now_ms();
    if (now - c->reset_window_ms >= 1000) {
        c->reset_window_ms = now;
        c->resets_in_window = 0;
    }
    int over = c->server && c->peer_key ? limits_reset(e, c->peer_key, now) : ++c->resets_in_window > budget;
    if (!budget || !over || c->ending)
        return;
    ctr_add(e, AMBIT_C_RESET_FLOODS, 1);
    nghttp2_session_terminate_session(c->h2, NGHTTP2_ENHANCE_YOUR_CALM);
    conn_fail(c, AMBIT_C_ERRORS_PROTOCOL, "stream reset budget exceeded (rapid reset)%s", "");
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    hconn *c = user_data;
    if (frame->hd.type == NGHTTP2_GOAWAY) {
        if (frame->goaway.error_code != NGHTTP2_NO_ERROR) {
            c->goaway_recv = 1;
            conn_fail(c, AMBIT_C_ERRORS_PROTOCOL, "peer sent GOAWAY: %s",
                      nghttp2_http2_strerror(frame->goaway.error_code));
        } else if (!c->goaway_recv) {
            /* Graceful: no new stream on this connection (open_stream refuses); the proxy re-pools. */
            c->goaway_recv = 1;
            ambit_event ev;
            event_init(&ev, AMBIT_EV_PEER_GOAWAY, c->id, 0, c->tag);
            copy_str(ev.peer_id, sizeof(ev.peer_id), c->peer_id);
            ev.status = (int)frame->goaway.last_stream_id;
            event_emit(c->l->engine, &ev);
        }
        return 0;
    }
    if (frame->hd.type == NGHTTP2_RST_STREAM)
        conn_count_reset(c);
    hstream *s = frame->hd.stream_id ? nghttp2_session_get_stream_user_data(session, frame->hd.stream_id) : NULL;
    if (!s)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS) {
        if (c->server && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
            server_request(c, s);
        } else if (!c->server && s->status >= 200 && s->status < 300 && !s->opened) {
            s->opened = 1;
            /* A fast path stream was reported (fast_open) when it was opened: Python records it as up from
             * there, so its 200 costs Python no event (a refusal or an end still reports as usual). */
            if (!(s->tag & AMBIT_FAST_TAG_BIT)) {
                ambit_event ev;
                event_init(&ev, AMBIT_EV_STREAM_OPEN, c->id, s->id, s->tag);
                ev.status = s->status;
                copy_str(ev.authority, sizeof(ev.authority), s->authority);
                event_emit(c->l->engine, &ev);
            }
        }
    }
    if ((frame->hd.type == NGHTTP2_HEADERS || frame->hd.type == NGHTTP2_DATA) &&
        (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        s->peer_eof = 1;
        mark_ready(s);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                         size_t len, void *user_data)
{
    (void)flags;
    hconn *c = user_data;
    hstream *s = nghttp2_session_get_stream_user_data(session, stream_id);
    if (!s || s->tcp_failed || s->local_reset || s->wr_dead) {
        if (s)
            s->unconsumed += len;
        else
            c->conn_unconsumed += len;
        return 0;
    }
    s->bytes_in += len;
    /* Common case: the socket keeps up, so write straight from the TLS read buffer without queueing. */
    if (s->io.fd >= 0 && s->writable && !abuf_pending(&s->out)) {
        ssize_t n = write(s->io.fd, data, len);
        if (n > 0) {
            s->unconsumed += (size_t)n;
            data += n;
            len -= (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            s->writable = 0;
        }
    }
    if (len && abuf_append(&s->out, data, len) < 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    mark_ready(s);
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code, void *user_data)
{
    hconn *c = user_data;
    hstream *s = nghttp2_session_get_stream_user_data(session, stream_id);
    if (!s || c->tearing_down)
        return 0;
    s->h2_closed = 1;
    s->h2_error = error_code;
    mark_ready(s);
    return 0;
}

static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    hconn *c = user_data;
    if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR)
        conn_fail(c, AMBIT_C_ERRORS_PROTOCOL, "protocol error, sent GOAWAY: %s",
                  nghttp2_http2_strerror(frame->goaway.error_code));
    if (frame->hd.type == NGHTTP2_RST_STREAM && frame->rst_stream.error_code == NGHTTP2_REFUSED_STREAM)
        ctr_add(c->l->engine, AMBIT_C_REFUSED_STREAMS_CONN, 1);
    if (frame->hd.type == NGHTTP2_HEADERS && c->server) {
        hstream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
        /* A refusal: the client may still be sending; NO_ERROR asks it to stop without error (RFC 9113
         * 8.1). Sent only after the response, since nghttp2 would otherwise drop the queued HEADERS. */
        if (s && s->rejected && !s->h2_closed)
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, s->h2id, NGHTTP2_NO_ERROR);
    }
    return 0;
}

static int on_h2_error(nghttp2_session *session, int lib_error_code, const char *msg, size_t len, void *user_data)
{
    (void)session, (void)lib_error_code, (void)len;
    hconn *c = user_data;
    if (!c->ending && !c->error[0])
        snprintf(c->error, sizeof(c->error), "h2: %s", msg); /* kept as detail if the connection fails */
    return 0;
}

/* DATA frames up to AMBIT_MAX_FRAME (what the peer allows): a frame arrives as one chunk per TLS read batch,
 * so the receiver writes its socket once per 128 KiB instead of once per 16 KiB frame. */
static ssize_t on_data_length(nghttp2_session *session, uint8_t frame_type, int32_t stream_id,
                              int32_t session_window, int32_t stream_window, uint32_t remote_max_frame,
                              void *user_data)
{
    (void)session, (void)frame_type, (void)stream_id, (void)user_data;
    int64_t n = AMBIT_MAX_FRAME;
    if (remote_max_frame < n)
        n = remote_max_frame;
    if (session_window < n)
        n = session_window;
    if (stream_window < n)
        n = stream_window;
    return n > 0 ? (ssize_t)n : 1;
}

static nghttp2_session_callbacks *h2_cbs;
static pthread_once_t h2_cbs_once = PTHREAD_ONCE_INIT;

static void h2_callbacks_init(void)
{
    nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return;
    nghttp2_session_callbacks_set_send_callback(cbs, on_send);
    nghttp2_session_callbacks_set_send_data_callback(cbs, on_send_data);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_error_callback2(cbs, on_h2_error);
    nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, on_data_length);
    h2_cbs = cbs;
}

static int h2_setup(hconn *c)
{
    nghttp2_option *opt;
    pthread_once(&h2_cbs_once, h2_callbacks_init);
    if (!h2_cbs || nghttp2_option_new(&opt) != 0)
        return -1;
    nghttp2_option_set_no_auto_window_update(opt, 1);
    int rv = c->server ? nghttp2_session_server_new2(&c->h2, h2_cbs, c, opt)
                       : nghttp2_session_client_new2(&c->h2, h2_cbs, c, opt);
    nghttp2_option_del(opt);
    if (rv != 0)
        return -1;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, AMBIT_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
         (uint32_t)__atomic_load_n(&c->l->engine->limits[AMBIT_L_MAX_CONCURRENT_STREAMS], __ATOMIC_RELAXED)},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, AMBIT_ACCEPT_FRAME},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, c->server ? 3 : 4) != 0)
        return -1;
    return nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, AMBIT_CONN_WINDOW);
}

/* ---- TLS side ---- */

/* Records are written through a buffer BIO, so one send() carries many 16 KiB records; reads use the
 * socket directly (read-ahead on the context already batches them). */
/* Watches OpenSSL's socket reads: a short one means the socket was drained (see conn_read). */
static long on_sock_bio(BIO *b, int oper, const char *argp, size_t len, int argi, long argl, int ret,
                        size_t *processed)
{
    (void)argp, (void)argi, (void)argl;
    if (oper == (BIO_CB_READ | BIO_CB_RETURN)) {
        hconn *c = (hconn *)BIO_get_callback_arg(b);
        c->sock_drained = ret > 0 && processed && *processed < len;
    }
    return ret;
}

static int conn_set_bios(hconn *c, int fd)
{
    BIO *sock = BIO_new_socket(fd, BIO_NOCLOSE);
    if (sock) {
        BIO_set_callback_ex(sock, on_sock_bio);
        BIO_set_callback_arg(sock, (char *)c);
    }
    BIO *buf = BIO_new(BIO_f_buffer());
    /* The buffer starts at BIO_f_buffer's default size and grows to AMBIT_TLS_WBUF after the handshake
     * (conn_flush): an unauthenticated handshake must not cost a 256 KiB buffer. */
    if (!sock || !buf || BIO_up_ref(sock) != 1) {
        BIO_free(sock);
        BIO_free(buf);
        return -1;
    }
    BIO_push(buf, sock);
    SSL_set_bio(c->ssl, sock, buf); /* one reference each; the buffer BIO holds the second one */
    c->wbio = buf;
    return 0;
}

/* Pushes buffered records to the socket: 1 done, 0 would block, -1 error. */
static int conn_bio_flush(hconn *c)
{
    if (!BIO_wpending(c->wbio))
        return 1;
    if (BIO_flush(c->wbio) == 1)
        return 1;
    if (BIO_should_retry(c->wbio)) {
        c->writable = 0;
        return 0;
    }
    return -1;
}

static void handshake_done(hconn *c)
{
    ambit_engine *e = c->l->engine;
    ambit_event ev;
    event_init(&ev, c->server ? AMBIT_EV_PEER_VERIFIED : AMBIT_EV_HANDSHAKE_DONE, c->id, 0, c->tag);
    tls_peer_info(c->ssl, &ev);
    if (SSL_get_verify_result(c->ssl) != X509_V_OK) {
        conn_fail(c, AMBIT_C_ERRORS_HANDSHAKE, "peer certificate not verified%s", "");
        return;
    }
    if (!ev.peer_id[0]) {
        conn_fail(c, AMBIT_C_ERRORS_PEER_IDENTITY, "peer certificate has no single URI SAN%s", "");
        return;
    }
    if (!c->server && strcmp(ev.peer_id, c->expected_peer) != 0) {
        conn_fail(c, AMBIT_C_ERRORS_PEER_IDENTITY, "peer identity mismatch: got %s", ev.peer_id);
        return;
    }
    copy_str(c->peer_id, sizeof(c->peer_id), ev.peer_id);
    if (c->server) {
        c->peer_key = limits_peer_key(c->peer_id);
        limits_peer_conn(e, c->peer_key, 1);
        limits_handshake_over(e, c->src_key);
        c->hs_counted = 0;
        /* The HTTP/2 session of a served connection exists only once its peer is authenticated. */
        if (h2_setup(c) != 0) {
            conn_fail(c, AMBIT_C_ERRORS_COMMAND, "cannot create HTTP/2 session%s", "");
            return;
        }
    }
    ctr_add(e, AMBIT_C_HANDSHAKES_DONE, 1);
    if (SSL_session_reused(c->ssl))
        ctr_add(e, AMBIT_C_HANDSHAKES_RESUMED, 1);
    event_emit(e, &ev);
    c->state = HS_H2;
    c->readable = 1; /* read-ahead may already hold the peer's first frames */
    mark_dirty(c);
}

static void conn_read(hconn *c)
{
    char *buf = c->l->rbuf;
    while (!c->ending) {
        size_t fill = 0, n = 0;
        int err = SSL_ERROR_NONE, drained = 0;
        /* Batch several records per nghttp2 call. */
        while (fill < AMBIT_READ_CHUNK - 16384) {
            c->sock_drained = 0;
            if (SSL_read_ex(c->ssl, buf + fill, AMBIT_READ_CHUNK - fill, &n) != 1) {
                err = SSL_get_error(c->ssl, 0);
                break;
            }
            fill += n;
            /* Everything buffered is decrypted and the socket read was short: the socket is drained, and
             * edge-triggered epoll reports what comes next, so skip the read() that would say EAGAIN. Not
             * after a hang-up event: that edge is gone and the EOF (or close_notify) must still be read. */
            if (c->sock_drained && !c->rdhup && !SSL_has_pending(c->ssl)) {
                drained = 1;
                break;
            }
        }
        if (fill) {
            c->last_rx_ms = now_ms();
            c->ping_sent_ms = 0; /* any traffic proves the peer alive */
            c->bytes_in += fill;
            ctr_add(c->l->engine, AMBIT_C_TLS_BYTES_IN, (int64_t)fill);
            ssize_t rv = nghttp2_session_mem_recv(c->h2, (const uint8_t *)buf, fill);
            announce_requests(c);
            if (rv < 0) {
                conn_fail(c, AMBIT_C_ERRORS_PROTOCOL, "h2 protocol error: %s", nghttp2_strerror((int)rv));
                return;
            }
            mark_dirty(c);
        }
        if (drained) {
            c->readable = 0;
            return;
        }
        if (err == SSL_ERROR_NONE)
            continue;
        if (err == SSL_ERROR_WANT_READ) {
            c->readable = 0;
            return;
        }
        if (err == SSL_ERROR_WANT_WRITE)
            return;
        if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && errno == 0) ||
            (err == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)) {
            ERR_clear_error();
            if (c->goaway_recv || c->closing)
                c->ending = c->ending ? c->ending : END_GRACEFUL;
            else
                conn_fail(c, AMBIT_C_ERRORS_IO, "connection closed by peer without GOAWAY%s", "");
            mark_dirty(c);
            return;
        }
        char msg[200];
        tls_last_error(msg, sizeof(msg), err == SSL_ERROR_SYSCALL ? strerror(errno) : "TLS read");
        conn_fail(c, AMBIT_C_ERRORS_IO, "%s", msg);
        return;
    }
}

static void conn_flush(hconn *c)
{
    if (!c->wbio_big && !BIO_wpending(c->wbio)) /* resizing drops pending bytes: only when empty */
        c->wbio_big = BIO_set_write_buffer_size(c->wbio, AMBIT_TLS_WBUF) == 1;
    for (;;) {
        if (abuf_pending(&c->wbuf) < AMBIT_WBUF_HIGH) {
            int rv = nghttp2_session_send(c->h2);
            if (rv != 0) {
                conn_fail(c, AMBIT_C_ERRORS_PROTOCOL, "h2 send: %s", nghttp2_strerror(rv));
                return;
            }
        }
        if (!abuf_pending(&c->wbuf) || !c->writable)
            break;
        size_t w = 0;
        if (SSL_write_ex(c->ssl, abuf_head(&c->wbuf), abuf_pending(&c->wbuf), &w) == 1) {
            abuf_consume(&c->wbuf, w);
            c->bytes_out += w;
            ctr_add(c->l->engine, AMBIT_C_TLS_BYTES_OUT, (int64_t)w);
            continue;
        }
        int err = SSL_get_error(c->ssl, 0);
        if (err == SSL_ERROR_WANT_WRITE) {
            c->writable = 0;
            return;
        }
        if (err == SSL_ERROR_WANT_READ)
            return;
        char msg[200];
        tls_last_error(msg, sizeof(msg), err == SSL_ERROR_SYSCALL ? strerror(errno) : "TLS write");
        conn_fail(c, AMBIT_C_ERRORS_IO, "%s", msg);
        return;
    }
    if (c->writable && conn_bio_flush(c) < 0)
        conn_fail(c, AMBIT_C_ERRORS_IO, "send: %s", strerror(errno));
}

static void conn_handshake(hconn *c)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        handshake_done(c);
        return;
    }
    int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ) {
        c->readable = 0;
        return;
    }
    if (err == SSL_ERROR_WANT_WRITE) {
        c->writable = 0;
        return;
    }
    char msg[200];
    long vr = SSL_get_verify_result(c->ssl);
    int counter = AMBIT_C_ERRORS_HANDSHAKE;
    /* c->peer_id holds who the leaf claimed to be, if anyone (the verify callback wrote it) */
    if (c->verdict.why) { /* refused in verification, with an alert: say why */
        snprintf(msg, sizeof(msg), "TLS handshake failed: %s", c->verdict.why);
        if (strstr(c->verdict.why, "identity"))
            counter = AMBIT_C_ERRORS_PEER_IDENTITY;
    } else if (vr == X509_V_ERR_APPLICATION_VERIFICATION)
        snprintf(msg, sizeof(msg), "TLS handshake failed: peer leaf certificate is a CA (CA:true)");
    else if (vr != X509_V_OK)
        snprintf(msg, sizeof(msg), "TLS handshake failed: certificate verify: %s", X509_verify_cert_error_string(vr));
    else
        tls_last_error(msg, sizeof(msg), err == SSL_ERROR_SYSCALL ? "TLS handshake failed (connection closed)"
                                                                  : "TLS handshake failed");
    ERR_clear_error();
    conn_fail(c, counter, "%s", msg);
}

static void conn_drive(hconn *c)
{
    if (c->state == HS_TLS && !c->ending)
        conn_handshake(c);
    if (c->state == HS_H2 && !c->ending && c->readable)
        conn_read(c);
    mark_dirty(c);
}

static void on_conn_io(ambit_loop *l, aio *io, uint32_t events)
{
    (void)l;
    hconn *c = io->owner;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->readable = 1;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->rdhup = 1;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        c->writable = 1;
    conn_drive(c);
}

static void conn_end(hconn *c)
{
    ambit_loop *l = c->l;
    ambit_engine *e = l->engine;
    c->tearing_down = 1;
    c->reqs = c->reqs_tail = NULL;
    if (c->ending == END_ERROR && c->state == HS_H2 && c->h2) {
        /* Best effort: let the peer see our GOAWAY (protocol error, reset flood) before the reset. Streams
         * are still alive here: nghttp2 may call their data callbacks. */
        c->writable = 1;
        conn_flush(c);
    }
    if (c->on_dirty) /* re-queued by its own flush (e.g. a GOAWAY sent while ending) */
        for (hconn **pp = &l->dirty; *pp; pp = &(*pp)->dirty_next)
            if (*pp == c) {
                *pp = c->dirty_next;
                break;
            }
    if (c->ending == END_ERROR) {
        ambit_event ev;
        event_init(&ev, AMBIT_EV_CONN_ERROR, c->id, 0, c->tag);
        copy_str(ev.peer_id, sizeof(ev.peer_id), c->peer_id);
        copy_str(ev.detail, sizeof(ev.detail), c->error);
        ctr_add(e, c->err_counter, 1);
        event_emit(e, &ev);
    }
    /* Streams still alive lose their tunnel: their sockets are reset, as a peer RST would. */
    if (c->streams) {
        hstream **pp = &l->ready;
        while (*pp) {
            if ((*pp)->conn == c)
                *pp = (*pp)->ready_next;
            else
                pp = &(*pp)->ready_next;
        }
    }
    while (c->streams) {
        hstream *s = c->streams;
        /* A stream already ended cleanly (END_STREAM both ways) only waited for its socket to take the
         * last bytes: it ends as it would have, with an empty detail; the others were cut. */
        int clean = s->h2_closed && s->h2_error == NGHTTP2_NO_ERROR;
        if (!s->h2_closed)
            s->h2_error = NGHTTP2_CANCEL;
        s->h2_closed = 1;
        stream_finish(s, clean ? NULL : "connection closed");
    }
    if (c->server) {
        limits_conn_end(e, c->src_key, c->hs_counted);
        if (c->peer_key)
            limits_peer_conn(e, c->peer_key, -1);
    }
    if (c->ending == END_GRACEFUL && c->state == HS_H2) {
        SSL_shutdown(c->ssl); /* best effort close_notify; the socket is non-blocking */
    }
    ERR_clear_error();
    loop_del_fd(l, &c->io);
    /* A failed handshake wrote a TLS alert (maybe flushed already): send what is left, then no reset (it
     * could destroy the alert before the peer reads it), so the peer learns why instead of a bare EOF. */
    int alerted = c->state == HS_TLS && c->ssl && c->verdict.alert_sent &&
                  (!BIO_wpending(c->wbio) || BIO_flush(c->wbio) == 1);
    ERR_clear_error();
    if (c->ending == END_ERROR && !alerted)
        reset_close(c->io.fd);
    else if (alerted)
        linger_drain(l, c->io.fd); /* unread input would turn close() into a RST that can destroy the alert */
    else
        close(c->io.fd);
    SSL_free(c->ssl);
    nghttp2_session_del(c->h2);
    ambit_event ev;
    event_init(&ev, AMBIT_EV_CONN_CLOSED, c->id, 0, c->tag);
    copy_str(ev.peer_id, sizeof(ev.peer_id), c->peer_id);
    copy_str(ev.detail, sizeof(ev.detail), c->ending == END_ERROR ? c->error : "");
    ev.bytes_in = c->bytes_in;
    ev.bytes_out = c->bytes_out;
    ctr_add(e, AMBIT_C_CONNS_CLOSED, 1);
    ctr_add(e, AMBIT_C_CONNS_ACTIVE, -1);
    event_emit(e, &ev);
    amap_del(&l->conns, c->id);
    abuf_free(&c->wbuf);
    free(c->expected_peer);
    free(c);
}

static void conn_service(hconn *c)
{
    if (c->state == HS_H2 && !c->ending) {
        if (c->conn_unconsumed) {
            nghttp2_session_consume_connection(c->h2, c->conn_unconsumed);
            c->conn_unconsumed = 0;
        }
        conn_flush(c);
        if (!c->ending && !c->streams && !abuf_pending(&c->wbuf) && !BIO_wpending(c->wbio) &&
            !nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2))
            c->ending = END_GRACEFUL;
    }
    if (c->ending)
        conn_end(c);
}

void hconn_process_pending(ambit_loop *l)
{
    for (int round = 0; round < READY_ROUNDS && (l->ready || l->dirty); round++) {
        while (l->ready) {
            hstream *s = l->ready;
            l->ready = s->ready_next;
            s->on_ready = 0;
            stream_service(s);
        }
        while (l->dirty) {
            hconn *c = l->dirty;
            l->dirty = c->dirty_next;
            c->on_dirty = 0;
            conn_service(c);
        }
    }
}

/* ---- commands ---- */

void hconn_start(ambit_loop *l, acmd *cmd, int server)
{
    ambit_engine *e = l->engine;
    const char *why = NULL;
    uint64_t src = 0;
    hconn *c = NULL;
    if (server) {
        src = limits_source_key(cmd->fd);
        if ((why = limits_conn_start(e, src))) {
            /* Over a cap: refused before any TLS state exists, counted; the client sees a reset. */
            ctr_add(e, strstr(why, "connections") ? AMBIT_C_REFUSED_CONNS_SOURCE : AMBIT_C_REFUSED_HANDSHAKES, 1);
            reset_close(cmd->fd);
            cmd->fd = -1;
            goto report;
        }
    }
    c = calloc(1, sizeof(*c));
    why = "out of memory";
    if (!c)
        goto fail;
    c->id = cmd->id;
    c->tag = cmd->tag;
    c->l = l;
    c->server = server;
    c->src_key = src;
    c->hs_counted = server;
    c->io.owner = c;
    c->io.on_event = on_conn_io;
    c->io.fd = -1;
    c->expected_peer = cmd->text;
    cmd->text = NULL;
    c->started_ms = c->last_rx_ms = now_ms();
    c->ssl = SSL_new(cmd->ctx);
    why = "cannot create TLS or HTTP/2 session";
    if (!c->ssl || conn_set_bios(c, cmd->fd) < 0 || (!server && h2_setup(c) != 0) ||
        amap_put(&l->conns, c->id, c) < 0)
        goto fail;
    c->verdict.engine = e;
    c->verdict.server = server;
    c->verdict.presented = c->peer_id;
    c->verdict.presented_cap = sizeof(c->peer_id);
    tls_verdict_attach(c->ssl, &c->verdict);
    if (server) {
        SSL_set_accept_state(c->ssl);
    } else {
        SSL_set_connect_state(c->ssl);
        tls_client_session_prepare(c->ssl, cmd->ctx, c->expected_peer);
    }
    ctr_add(e, AMBIT_C_CONNS_OPENED, 1);
    ctr_add(e, AMBIT_C_CONNS_ACTIVE, 1);
    c->io.fd = cmd->fd;
    cmd->fd = -1;
    if (loop_add_fd(l, &c->io, c->io.fd) < 0)
        conn_fail(c, AMBIT_C_ERRORS_IO, "epoll: %s", strerror(errno));
    return;
fail:
    if (c) {
        SSL_free(c->ssl);
        nghttp2_session_del(c->h2);
        free(c->expected_peer);
        free(c);
    }
    if (server)
        limits_conn_end(e, src, 1);
    ERR_clear_error();
    ctr_add(e, AMBIT_C_ERRORS_COMMAND, 1);
report:;
    ambit_event ev;
    event_init(&ev, AMBIT_EV_CONN_ERROR, cmd->id, 0, cmd->tag);
    copy_str(ev.detail, sizeof(ev.detail), why);
    event_emit(e, &ev);
    event_init(&ev, AMBIT_EV_CONN_CLOSED, cmd->id, 0, cmd->tag);
    copy_str(ev.detail, sizeof(ev.detail), why);
    event_emit(e, &ev);
}

static void refuse_unknown(ambit_loop *l, acmd *cmd, const char *why)
{
    ambit_event ev;
    event_init(&ev, AMBIT_EV_STREAM_REFUSED, cmd->id, cmd->id2, cmd->tag);
    copy_str(ev.authority, sizeof(ev.authority), cmd->text);
    copy_str(ev.detail, sizeof(ev.detail), why);
    ctr_add(l->engine, AMBIT_C_STREAMS_REFUSED, 1);
    event_emit(l->engine, &ev);
}

/* "name: value\n" lines -> nv entries pointing into text (lengths only, no copy). -1 when malformed: names
 * lowercase [a-z0-9-] and not one the engine owns or HTTP/2 forbids, values without CR/NUL, bounded. */
static int parse_extra_headers(char *text, nghttp2_nv *nv)
{
    static const char *const reserved[] = {"forwarded", "connection", "host", "te", "transfer-encoding",
                                           "upgrade", "keep-alive", "proxy-connection", NULL};
    int n = 0;
    if (!text || !*text)
        return 0;
    if (strlen(text) > AMBIT_EXTRA_BYTES || strchr(text, '\r'))
        return -1;
    for (char *line = text; *line;) {
        char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        char *colon = memchr(line, ':', len);
        if (!colon || colon == line || n == AMBIT_EXTRA_HEADERS)
            return -1;
        size_t nlen = (size_t)(colon - line);
        for (size_t i = 0; i < nlen; i++)
            if (!((line[i] >= 'a' && line[i] <= 'z') || (line[i] >= '0' && line[i] <= '9') || line[i] == '-'))
                return -1;
        for (int r = 0; reserved[r]; r++)
            if (strlen(reserved[r]) == nlen && !memcmp(reserved[r], line, nlen))
                return -1;
        char *value = colon + 1;
        while (value < line + len && *value == ' ')
            value++;
        nv[n++] = (nghttp2_nv){(uint8_t *)line, (uint8_t *)value, nlen, (size_t)(line + len - value),
                               NGHTTP2_NV_FLAG_NONE};
        line = end ? end + 1 : line + len;
    }
    return n;
}

int hconn_client_usable(ambit_loop *l, uint64_t id)
{
    hconn *c = amap_get(&l->conns, id);
    return c && !c->server && !c->closing && !c->ending && !c->goaway_recv;
}

void hconn_open_stream(ambit_loop *l, acmd *cmd)
{
    hconn *c = amap_get(&l->conns, cmd->id);
    if (!c || c->server || c->closing || c->ending || c->goaway_recv) {
        /* A connection that failed but whose conn_error is not out yet says why (e.g. the peer's identity) */
        refuse_unknown(l, cmd, !c ? "no such connection" : c->server ? "not a client connection"
                               : c->ending == END_ERROR ? c->error : "connection closing");
        return;
    }
    if (strlen(cmd->text) >= AMBIT_HEADER_MAX || !*cmd->text) {
        refuse_unknown(l, cmd, "bad authority");
        return;
    }
    if (cmd->text2 && (strlen(cmd->text2) >= AMBIT_HEADER_MAX || strpbrk(cmd->text2, "\r\n"))) {
        refuse_unknown(l, cmd, "bad forwarded header");
        return;
    }
    nghttp2_nv nv[3 + AMBIT_EXTRA_HEADERS];
    int extra = parse_extra_headers(cmd->text3, nv + 3);
    if (extra < 0) {
        refuse_unknown(l, cmd, "bad extra request header");
        return;
    }
    hstream *s = stream_new(c, cmd->id2, cmd->tag);
    if (!s) {
        refuse_unknown(l, cmd, "out of memory");
        return;
    }
    s->authority = cmd->text;
    cmd->text = NULL;
    s->forwarded = cmd->text2;
    cmd->text2 = NULL;
    /* CONNECT carries :method and :authority (RFC 9113 8.5), the source as `forwarded` (RFC 7239), then
     * the caller's extra headers (nghttp2 copies them: cmd->text3 is freed after this command). */
    nv[0] = (nghttp2_nv){(uint8_t *)":method", (uint8_t *)"CONNECT", 7, 7, NGHTTP2_NV_FLAG_NONE};
    nv[1] = (nghttp2_nv){(uint8_t *)":authority", (uint8_t *)s->authority, 10, strlen(s->authority),
                         NGHTTP2_NV_FLAG_NONE};
    int nnv = 2;
    if (s->forwarded)
        nv[nnv++] = (nghttp2_nv){(uint8_t *)"forwarded", (uint8_t *)s->forwarded, 9, strlen(s->forwarded),
                                 NGHTTP2_NV_FLAG_NONE};
    for (int i = 0; i < extra; i++)
        nv[nnv++] = nv[3 + i];
    nghttp2_data_provider prov = {.source.ptr = s, .read_callback = stream_read_cb};
    int32_t h2id = nghttp2_submit_request(c->h2, NULL, nv, (size_t)nnv, &prov, s);
    s->h2id = h2id; /* before the attach: its first read needs it (stream_sending) */
    if (h2id < 0 || stream_attach(s, cmd, 1) < 0) {
        s->h2_closed = 1;
        s->local_reset = 1;
        if (h2id > 0)
            nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, h2id, NGHTTP2_CANCEL);
        stream_finish(s, h2id < 0 ? nghttp2_strerror(h2id) : "epoll");
        return;
    }
    mark_dirty(c);
}

static hstream *server_stream(ambit_loop *l, acmd *cmd)
{
    hconn *c = amap_get(&l->conns, cmd->id);
    hstream *s = amap_get(&l->streams, cmd->id2);
    if (!c || !s || s->conn != c || !c->server || s->opened || s->status || c->ending ||
        (s->h2_closed && !s->announced)) {
        ctr_add(l->engine, AMBIT_C_ERRORS_COMMAND, 1);
        return NULL;
    }
    return s;
}

void hconn_accept(ambit_loop *l, acmd *cmd)
{
    hstream *s = server_stream(l, cmd);
    if (!s)
        return; /* the stream ended meanwhile (its stream_closed event was sent); cmd_free closes the fd */
    hconn *c = s->conn;
    s->tag = cmd->tag;
    if (stream_attach(s, cmd, 0) < 0) {
        s->local_reset = 1;
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, s->h2id, NGHTTP2_INTERNAL_ERROR);
        mark_dirty(c);
        return;
    }
    nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE};
    nghttp2_data_provider prov = {.source.ptr = s, .read_callback = stream_read_cb};
    s->opened = 1;
    s->status = 200;
    if (!s->h2_closed) /* else: reset meanwhile; its bytes are written, then the socket is reset */
        nghttp2_submit_response(c->h2, s->h2id, &nv, 1, &prov);
    mark_ready(s);
    mark_dirty(c);
}

void hconn_reject(ambit_loop *l, acmd *cmd)
{
    hstream *s = server_stream(l, cmd);
    if (!s)
        return;
    hconn *c = s->conn;
    char status[4];
    snprintf(status, sizeof(status), "%03d", cmd->status);
    nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE};
    s->status = cmd->status;
    s->rejected = 1;
    if (!s->h2_closed)
        nghttp2_submit_response(c->h2, s->h2id, &nv, 1, NULL);
    mark_ready(s);
    mark_dirty(c);
}

void hconn_reset(ambit_loop *l, acmd *cmd)
{
    hconn *c = amap_get(&l->conns, cmd->id);
    hstream *s = amap_get(&l->streams, cmd->id2);
    if (!c || !s || s->conn != c) {
        ctr_add(l->engine, AMBIT_C_ERRORS_COMMAND, 1);
        return;
    }
    s->local_reset = 1;
    if (!s->h2_closed && s->h2id > 0)
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, s->h2id, NGHTTP2_CANCEL);
    else
        s->h2_closed = 1;
    mark_ready(s);
    mark_dirty(c);
}

int hconn_close_cmd(ambit_loop *l, uint64_t id)
{
    hconn *c = amap_get(&l->conns, id);
    if (!c)
        return 0;
    c->closing = 1;
    if (c->state == HS_H2)
        nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c->h2),
                              NGHTTP2_NO_ERROR, NULL, 0);
    else if (!c->ending)
        c->ending = END_GRACEFUL;
    mark_dirty(c);
    return 1;
}

static void conn_tick(void *value, void *arg)
{
    hconn *c = value;
    uint64_t now = *(const uint64_t *)arg;
    ambit_engine *e = c->l->engine;
    if (c->ending)
        return;
    uint64_t hs = (uint64_t)__atomic_load_n(&e->handshake_timeout_ms, __ATOMIC_RELAXED);
    uint64_t idle = (uint64_t)__atomic_load_n(&e->keepalive_idle_ms, __ATOMIC_RELAXED);
    uint64_t answer = (uint64_t)__atomic_load_n(&e->keepalive_timeout_ms, __ATOMIC_RELAXED);
    if (c->state == HS_TLS) {
        if (hs && now - c->started_ms > hs)
            conn_fail(c, AMBIT_C_ERRORS_HANDSHAKE, "TLS handshake timed out%s", "");
        return;
    }
    if (c->ping_sent_ms) {
        if (answer && now - c->ping_sent_ms > answer)
            conn_fail(c, AMBIT_C_ERRORS_IO, "keepalive: no answer to PING%s", "");
    } else if (idle && now - c->last_rx_ms > idle) {
        /* An idle pooled connection must notice a dead peer (no FIN after a crash or a cut link). */
        nghttp2_submit_ping(c->h2, NGHTTP2_FLAG_NONE, NULL);
        c->ping_sent_ms = now;
        mark_dirty(c);
    }
}

void hconn_tick(ambit_loop *l)
{
    uint64_t now = now_ms();
    amap_each(&l->conns, conn_tick, &now);
}

void hconn_destroy_all(ambit_loop *l)
{
    l->ready = NULL;
    l->dirty = NULL;
    hconn *c;
    while ((c = amap_any(&l->conns))) {
        c->on_dirty = 0;
        if (!c->ending)
            c->ending = END_GRACEFUL;
        conn_end(c);
    }
}
