/* HTTP/2 from clients (RFC 9113, nghttp2 server sessions): each stream's request is turned into HTTP/1.1
 * bytes (pseudo-headers to the request line and Host, cookies joined, a body without content-length sent
 * chunked) and fed to a socket-less request connection of http1.c, so routing, limits and the WAF are the
 * HTTP/1.1 path's, unchanged. Its answer (the backend's response, or the gateway's own) comes back as
 * HTTP/1.1 bytes, which a response parser turns into HEADERS and DATA on the stream. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <nghttp2/nghttp2.h>

#include "conn.h"

const char H2_PREFACE[24] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#define H2_MAX_STREAMS 100
#define H2_RESP_HIGH (1024 * 1024) /* response body held per stream before the backend is paused */

struct h2_stream {
    int32_t id;
    gw_h2 *h2;
    gw_conn *pc;             /* the request connection; NULL once it is gone */
    h2_stream *next;
    abuf req;                /* the request head being built */
    abuf cookie;
    char method[24];
    abuf path, authority;
    int nheaders, chunked, bad;
    /* the response */
    llhttp_t rparser;
    abuf rhead;
    hdr_list rh;
    abuf rbody;
    int submitted, resp_done, deferred, want_drive, head_method;
};

struct gw_h2 {
    nghttp2_session *s;
    gw_conn *c;
    h2_stream *streams;
    int nstreams;
    int busy;                /* inside nghttp2 (recv or send): output waits for the next h2_send */
    gw_conn *flushing;       /* the stream connection whose output is being taken: never driven from inside */
};

static llhttp_settings_t resp_settings;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* ---------- response: HTTP/1.1 bytes -> HEADERS + DATA ---------- */

static int r_field(llhttp_t *p, const char *at, size_t len)
{
    h2_stream *st = p->data;
    return hdr_list_field(&st->rh, &st->rhead, at, len);
}

static int r_value(llhttp_t *p, const char *at, size_t len)
{
    h2_stream *st = p->data;
    hdr_list_value(&st->rh, &st->rhead, at, len);
    return 0;
}

static ssize_t read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *user)
{
    (void)s;
    (void)id;
    (void)user;
    h2_stream *st = src->ptr;
    size_t n = abuf_pending(&st->rbody) < len ? abuf_pending(&st->rbody) : len;
    memcpy(buf, abuf_head(&st->rbody), n);
    abuf_consume(&st->rbody, n);
    if (st->pc && abuf_pending(&st->rbody) < H2_RESP_HIGH / 2)
        st->want_drive = 1; /* room again: the request connection may read more of the response */
    if (st->resp_done && !abuf_pending(&st->rbody))
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    else if (n == 0) {
        st->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

static int hop_by_hop(const char *name, size_t len)
{
    static const char *const names[] = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                                        "upgrade", "te", NULL};
    for (int i = 0; names[i]; i++)
        if (strlen(names[i]) == len && strncasecmp(names[i], name, len) == 0)
            return 1;
    return 0;
}

static int r_headers_complete(llhttp_t *p)
{
    h2_stream *st = p->data;
    int code = p->status_code;
    if (code >= 100 && code < 200)
        return 0; /* interim: not relayed, the final response follows */
    nghttp2_nv nva[128];
    char status[8];
    snprintf(status, sizeof(status), "%03d", code > 999 ? 999 : code);
    int n = 0;
    nva[n++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE};
    for (int i = 0; i < st->rh.n && n < 128; i++) {
        char *name = st->rhead.data + st->rh.v[i].name_off;
        if (hop_by_hop(name, st->rh.v[i].name_len))
            continue;
        for (size_t k = 0; k < st->rh.v[i].name_len; k++) /* h2 field names are lower case */
            if (name[k] >= 'A' && name[k] <= 'Z')
                name[k] = (char)(name[k] + 32);
        nva[n++] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)st->rhead.data + st->rh.v[i].val_off,
                                st->rh.v[i].name_len, st->rh.v[i].val_len, NGHTTP2_NV_FLAG_NONE};
    }
    int no_body = st->head_method || code == 204 || code == 304;
    nghttp2_data_provider prd = {.source.ptr = st, .read_callback = read_body};
    if (nghttp2_submit_response(st->h2->s, st->id, nva, (size_t)n, no_body ? NULL : &prd) != 0)
        return -1;
    st->submitted = 1;
    return no_body ? 1 : 0;
}

static int r_body(llhttp_t *p, const char *at, size_t len)
{
    h2_stream *st = p->data;
    abuf_append(&st->rbody, at, len);
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(st->h2->s, st->id);
    }
    return 0;
}

static int r_message_complete(llhttp_t *p)
{
    h2_stream *st = p->data;
    if (p->status_code >= 100 && p->status_code < 200) {
        hdr_list_clear(&st->rh);
        abuf_clear(&st->rhead);
        return 0;
    }
    st->resp_done = 1;
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(st->h2->s, st->id);
    }
    return HPE_PAUSED;
}

static void settings_init(void)
{
    llhttp_settings_init(&resp_settings);
    resp_settings.on_header_field = r_field;
    resp_settings.on_header_value = r_value;
    resp_settings.on_headers_complete = r_headers_complete;
    resp_settings.on_body = r_body;
    resp_settings.on_message_complete = r_message_complete;
}

size_t h2_stream_output(h2_stream *st, const char *data, size_t len)
{
    if (st->resp_done || abuf_pending(&st->rbody) >= H2_RESP_HIGH)
        return st->resp_done ? len : 0;
    llhttp_errno_t err = llhttp_execute(&st->rparser, data, len);
    if (err != HPE_OK && err != HPE_PAUSED)
        nghttp2_submit_rst_stream(st->h2->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    gw_h2 *h = st->h2;
    if (!h->busy) {
        /* st may be gone after h2_send (its stream closed); the caller goes on reading its backend, so
         * its own connection is not driven from in here */
        gw_conn *parent = h->c, *prev = h->flushing;
        h->flushing = st->pc;
        if (h2_send(parent) == 0)
            http1_flush_socket(parent);
        h->flushing = prev;
    }
    return len;
}

void h2_stream_detach(h2_stream *st)
{
    st->pc = NULL;
    if (!st->resp_done && st->h2->s)
        nghttp2_submit_rst_stream(st->h2->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
}

/* ---------- request: HEADERS + DATA -> HTTP/1.1 bytes ---------- */

static void stream_free(h2_stream *st)
{
    abuf_free(&st->req);
    abuf_free(&st->cookie);
    abuf_free(&st->path);
    abuf_free(&st->authority);
    abuf_free(&st->rhead);
    abuf_free(&st->rbody);
    free(st->rh.v);
    free(st);
}

static void stream_unlink(gw_h2 *h, h2_stream *st)
{
    for (h2_stream **pp = &h->streams; *pp; pp = &(*pp)->next)
        if (*pp == st) {
            *pp = st->next;
            h->nstreams--;
            return;
        }
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *user)
{
    gw_h2 *h = user;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    h2_stream *st = h->nstreams < H2_MAX_STREAMS ? calloc(1, sizeof(*st)) : NULL;
    if (!st) {
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_REFUSED_STREAM);
        return 0;
    }
    st->id = f->hd.stream_id;
    st->h2 = h;
    st->next = h->streams;
    h->streams = st;
    h->nstreams++;
    llhttp_init(&st->rparser, HTTP_RESPONSE, &resp_settings);
    st->rparser.data = st;
    nghttp2_session_set_stream_user_data(s, st->id, st);
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *user)
{
    (void)flags;
    gw_h2 *h = user;
    h2_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (!st || f->hd.type != NGHTTP2_HEADERS || st->bad)
        return 0;
    const gw_limits *lim = &h->c->loop->g->limits;
    if (++st->nheaders > lim->max_headers || st->req.len + nlen + vlen > lim->max_header_bytes) {
        gw_count(h->c->loop->g, GW_C_HEADERS_TOO_LARGE, 1);
        st->bad = 431;
        return 0;
    }
    const char *n = (const char *)name, *v = (const char *)value;
    if (nlen == 7 && memcmp(n, ":method", 7) == 0)
        snprintf(st->method, sizeof(st->method), "%.*s", (int)vlen, v);
    else if (nlen == 5 && memcmp(n, ":path", 5) == 0)
        abuf_append(&st->path, v, vlen);
    else if (nlen == 10 && memcmp(n, ":authority", 10) == 0)
        abuf_append(&st->authority, v, vlen);
    else if (n[0] == ':')
        return 0; /* :scheme, :protocol */
    else if (nlen == 4 && memcmp(n, "host", 4) == 0) {
        if (!st->authority.len) /* :authority wins over Host (RFC 9113 8.3.1) */
            abuf_append(&st->authority, v, vlen);
    } else if (nlen == 6 && memcmp(n, "cookie", 6) == 0) { /* RFC 9113 8.2.3: joined with "; " */
        if (st->cookie.len)
            abuf_append(&st->cookie, "; ", 2);
        abuf_append(&st->cookie, v, vlen);
    } else {
        if (nlen == 14 && memcmp(n, "content-length", 14) == 0)
            st->chunked = -1; /* the body comes framed by its length */
        abuf_append(&st->req, n, nlen);
        abuf_append(&st->req, ": ", 2);
        abuf_append(&st->req, v, vlen);
        abuf_append(&st->req, "\r\n", 2);
    }
    return 0;
}

static void push(h2_stream *st, const char *data, size_t len)
{
    if (st->pc)
        http1_push_input(st->pc, data, len);
}

static void request_head(gw_h2 *h, h2_stream *st, int end_stream)
{
    if (st->bad || !st->method[0] || !st->path.len || strcmp(st->method, "CONNECT") == 0) {
        nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, st->id,
                                  st->bad ? NGHTTP2_REFUSED_STREAM : NGHTTP2_PROTOCOL_ERROR);
        return;
    }
    st->head_method = strcmp(st->method, "HEAD") == 0;
    st->chunked = !end_stream && st->chunked != -1;
    abuf head = {0};
    abuf_append(&head, st->method, strlen(st->method));
    abuf_append(&head, " ", 1);
    abuf_append(&head, abuf_head(&st->path), abuf_pending(&st->path));
    abuf_append(&head, " HTTP/1.1\r\nhost: ", 17);
    abuf_append(&head, abuf_head(&st->authority), abuf_pending(&st->authority));
    abuf_append(&head, "\r\n", 2);
    abuf_append(&head, abuf_head(&st->req), abuf_pending(&st->req));
    if (st->cookie.len) {
        abuf_append(&head, "cookie: ", 8);
        abuf_append(&head, abuf_head(&st->cookie), abuf_pending(&st->cookie));
        abuf_append(&head, "\r\n", 2);
    }
    if (st->chunked)
        abuf_append(&head, "transfer-encoding: chunked\r\n", 28);
    abuf_append(&head, "connection: close\r\n\r\n", 21); /* one request per stream connection */
    st->pc = http1_stream_conn(h->c, st);
    if (!st->pc)
        nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    else
        push(st, abuf_head(&head), abuf_pending(&head));
    abuf_free(&head);
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *user)
{
    gw_h2 *h = user;
    h2_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (!st)
        return 0;
    int end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST)
        request_head(h, st, end);
    else if (end && st->chunked == 1)
        push(st, "0\r\n\r\n", 5); /* trailers, if any, are dropped */
    return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len, void *user)
{
    (void)flags;
    (void)user;
    h2_stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (!st || !st->pc)
        return 0;
    if (st->chunked == 1) {
        char size[24];
        int n = snprintf(size, sizeof(size), "%zx\r\n", len);
        push(st, size, (size_t)n);
        push(st, (const char *)data, len);
        push(st, "\r\n", 2);
    } else {
        push(st, (const char *)data, len);
    }
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *user)
{
    (void)code;
    gw_h2 *h = user;
    h2_stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (!st)
        return 0;
    nghttp2_session_set_stream_user_data(s, id, NULL);
    stream_unlink(h, st);
    if (st->pc) {
        gw_conn *pc = st->pc;
        pc->stream = NULL; /* freed next: the connection must not reach it */
        st->pc = NULL;
        st->resp_done = 1;
        http1_kill(pc);
    }
    stream_free(st);
    return 0;
}

int h2_start(gw_conn *c)
{
    pthread_once(&once, settings_init);
    gw_h2 *h = calloc(1, sizeof(*h));
    nghttp2_session_callbacks *cb;
    if (!h || nghttp2_session_callbacks_new(&cb) != 0) {
        free(h);
        return -1;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    int rc = nghttp2_session_server_new(&h->s, cb, h);
    nghttp2_session_callbacks_del(cb);
    if (rc != 0) {
        free(h);
        return -1;
    }
    h->c = c;
    c->h2 = h;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, H2_MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)c->loop->g->limits.max_header_bytes},
    };
    nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    return 0;
}

int h2_feed(gw_conn *c, const char *data, size_t len)
{
    c->h2->busy = 1;
    ssize_t n = nghttp2_session_mem_recv(c->h2->s, (const uint8_t *)data, len);
    c->h2->busy = 0;
    if (n < 0) {
        gw_count(c->loop->g, GW_C_BAD_REQUESTS, 1);
        return -1;
    }
    return 0;
}

int h2_send(gw_conn *c)
{
    gw_h2 *h = c->h2;
    if (!h || h->busy)
        return 0;
    h->busy = 1;
    int rc = 0;
    /* Streams whose response body drained get driven (they may queue more DATA), then sent again; a few
     * rounds at most per call, the next event does the rest. */
    for (int round = 0; round < 16 && rc == 0; round++) {
        for (;;) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(h->s, &data);
            if (n < 0) {
                rc = -1;
                break;
            }
            if (n == 0)
                break;
            abuf_append(&c->out, data, (size_t)n);
        }
        int drove = 0;
        h->busy = 0; /* a driven stream's output submits frames; they are sent by the next round */
        for (h2_stream *st = h->streams; st; st = st->next)
            if (st->want_drive && st->pc && st->pc != h->flushing) {
                st->want_drive = 0;
                drove = 1;
                h->busy = 1;
                http1_drive(st->pc);
                h->busy = 0;
            }
        h->busy = 1;
        if (!drove)
            break;
    }
    h->busy = 0;
    return rc;
}

int h2_wants_close(gw_conn *c)
{
    nghttp2_session *s = c->h2->s;
    return !nghttp2_session_want_read(s) && !nghttp2_session_want_write(s) && !abuf_pending(&c->out);
}

void h2_close(gw_conn *c)
{
    gw_h2 *h = c->h2;
    c->h2 = NULL;
    while (h->streams) {
        h2_stream *st = h->streams;
        h->streams = st->next;
        if (st->pc) {
            st->pc->stream = NULL;
            http1_kill(st->pc);
        }
        stream_free(st);
    }
    nghttp2_session_del(h->s);
    free(h);
}
