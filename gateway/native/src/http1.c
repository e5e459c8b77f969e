/* Client connections (plain or TLS; HTTP/2 ones hand their streams to h2.c): llhttp parses each request, the
 * WAF sees the request line and headers as they complete and the body as it arrives (the body is held, up
 * to the route's limit, until phase 2 has passed: nothing reaches a backend before the WAF said yes), then
 * upstream.c forwards it and relays the response. One request per connection at a time: a pipelined next
 * request waits in the input buffer. Objects are never freed inside a handler: they are marked dead and
 * reaped after the epoll batch. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include "conn.h"

static llhttp_settings_t req_settings;
static pthread_once_t settings_once = PTHREAD_ONCE_INIT;
/* per-thread lists of the dead, freed after each epoll batch (a later event of the batch may name them) */
static __thread gw_conn *dead_conns;

static void conn_drive(gw_conn *c);

/* ---------- small helpers ---------- */

static uint64_t rng_next(gw_loop *l)
{
    uint64_t x = l->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return l->rng = x;
}

static void addr_text(const struct sockaddr_storage *ss, char *ip, int *port)
{
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, INET6_ADDRSTRLEN);
        *port = ntohs(a->sin6_port);
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, INET6_ADDRSTRLEN);
        *port = ntohs(a->sin_port);
    }
}

void http1_deadline(gw_conn *c, int kind, int ms)
{
    c->deadline_kind = ms > 0 ? kind : DL_NONE;
    c->deadline = ms > 0 ? gw_now_ms() + (uint64_t)ms : 0;
}


static const char *find_header(void *ctx, const char *name, size_t *vlen)
{
    gw_conn *c = ctx;
    size_t nl = strlen(name);
    for (int i = 0; i < c->hdrs.n; i++) {
        const hdr *h = &c->hdrs.v[i];
        if (h->name_len == nl && strncasecmp(hdr_name(c, h), name, nl) == 0) {
            *vlen = h->val_len;
            return hdr_val(c, h);
        }
    }
    return NULL;
}

/* ---------- lifetime ---------- */

static void request_reset(gw_conn *c)
{
    waf_end(c->tx);
    c->tx = NULL;
    gw_config_release(c->cfg);
    c->cfg = NULL;
    c->route = NULL;
    abuf_clear(&c->head);
    abuf_clear(&c->body);
    c->url_len = 0;
    hdr_list_clear(&c->hdrs);
    c->early_status = c->early_action = 0;
    c->retried = 0;
    c->await_token = 0;
    memset(&c->verdict, 0, sizeof(c->verdict));
}

void http1_kill(gw_conn *c)
{
    if (c->dead)
        return;
    c->dead = 1;
    if (c->up) {
        upstream_kill(c->up);
        c->up = NULL;
    }
    if (c->h2)
        h2_close(c);
    if (c->stream) {
        h2_stream_detach(c->stream);
        c->stream = NULL;
    }
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    request_reset(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        c->loop->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->fd >= 0) {
        atomic_fetch_sub(&c->loop->g->conns, 1);
        gw_count(c->loop->g, GW_C_CONNS_ACTIVE, (uint64_t)-1);
    }
    c->next = dead_conns;
    dead_conns = c;
}

void http1_reap(void)
{
    while (dead_conns) {
        gw_conn *c = dead_conns;
        dead_conns = c->next;
        abuf_free(&c->in);
        abuf_free(&c->out);
        abuf_free(&c->head);
        abuf_free(&c->body);
        free(c->hdrs.v);
        free(c);
    }
    upstream_reap();
}

/* ---------- client I/O ---------- */

/* >0 bytes, 0 EOF, -1 error, -2 would block */
static ssize_t client_read(gw_conn *c, char *buf, size_t n)
{
    if (c->fd < 0) /* an h2 stream's request: its bytes are pushed by h2.c */
        return -2;
    if (!c->ssl) {
        ssize_t r = read(c->fd, buf, n);
        return r >= 0 ? r : (errno == EAGAIN || errno == EINTR) ? -2 : -1;
    }
    int r = SSL_read(c->ssl, buf, (int)n);
    if (r > 0)
        return r;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return -2;
    return e == SSL_ERROR_ZERO_RETURN ? 0 : -1;
}

int http1_flush_socket(gw_conn *c)
{
    while (abuf_pending(&c->out)) {
        ssize_t w;
        if (c->ssl) {
            int r = SSL_write(c->ssl, abuf_head(&c->out), (int)abuf_pending(&c->out));
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                return e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ ? 0 : -1;
            }
            w = r;
        } else {
            w = send(c->fd, abuf_head(&c->out), abuf_pending(&c->out), MSG_NOSIGNAL);
            if (w < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -1;
        }
        gw_count(c->loop->g, GW_C_BYTES_OUT, (uint64_t)w);
        abuf_consume(&c->out, (size_t)w);
    }
    return 0;
}

int http1_flush(gw_conn *c)
{
    if (c->fd >= 0)
        return http1_flush_socket(c);
    if (!c->stream) /* the client reset the stream */
        return -1;
    abuf_consume(&c->out, h2_stream_output(c->stream, abuf_head(&c->out), abuf_pending(&c->out)));
    return c->dead ? -1 : 0;
}

/* ---------- events and stats ---------- */

static void copy_cut(char *dst, size_t dlen, const char *src, size_t slen)
{
    size_t n = slen < dlen - 1 ? slen : dlen - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

static void record(gw_conn *c, int action, int status, const char *detail)
{
    gw *g = c->loop->g;
    if (c->route)
        atomic_fetch_add(&g->route_stats[c->route->stat_slot][action], 1);
    if (action == GW_ACTION_ALLOWED)
        return;
    if (action != GW_ACTION_REFUSED) /* refusals have their own counters (bad_requests, ...) */
        gw_count(g, action == GW_ACTION_BLOCKED ? GW_C_WAF_BLOCKED
                    : action == GW_ACTION_DETECTED ? GW_C_WAF_DETECTED : GW_C_WAF_ERRORS, 1);
    gw_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.action = action;
    ev.status = status;
    ev.stat_slot = c->route ? c->route->stat_slot : -1;
    ev.score = c->verdict.score;
    ev.nrules = c->verdict.nrules;
    memcpy(ev.request_id, c->request_id, sizeof(ev.request_id));
    if (c->route)
        copy_cut(ev.route, sizeof(ev.route), c->route->name, strlen(c->route->name));
    snprintf(ev.client, sizeof(ev.client), "%s:%d", c->client_ip, c->client_port);
    size_t hl;
    const char *host = find_header(c, "host", &hl);
    if (host)
        copy_cut(ev.host, sizeof(ev.host), host, hl);
    copy_cut(ev.method, sizeof(ev.method), llhttp_method_name(c->parser.method),
             strlen(llhttp_method_name(c->parser.method)));
    copy_cut(ev.uri, sizeof(ev.uri), c->head.data ? c->head.data : "", c->url_len);
    memcpy(ev.rules, c->verdict.rules, sizeof(ev.rules));
    snprintf(ev.detail, sizeof(ev.detail), "%s", detail ? detail : c->verdict.detail);
    gw_emit(g, &ev);
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Error";
    }
}

/* A response of the gateway's own; the connection closes after it (the request may be unread). */
void http1_respond(gw_conn *c, int status, int action, const char *detail)
{
    char body[160], head[512];
    int bl = snprintf(body, sizeof(body), "%d %s\nrequest id: %s\n", status, reason_phrase(status),
                      c->request_id);
    int hl = snprintf(head, sizeof(head),
                      "HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                      "x-request-id: %s\r\nconnection: close\r\n\r\n",
                      status, reason_phrase(status), bl, c->request_id);
    abuf_append(&c->out, head, (size_t)hl);
    if (!c->is_head)
        abuf_append(&c->out, body, (size_t)bl);
    if (action != GW_ACTION_ALLOWED)
        record(c, action, status, detail);
    if (c->up) {
        upstream_kill(c->up);
        c->up = NULL;
    }
    c->state = ST_WAIT;
    c->closing = 1;
    http1_deadline(c, DL_IDLE, 5000); /* a client that never reads the answer is dropped */
    if (http1_flush(c) < 0 || !abuf_pending(&c->out))
        http1_kill(c);
}

/* ---------- request parsing (llhttp callbacks; parser.data is the connection) ---------- */

static int over_head_limit(gw_conn *c, size_t more)
{
    if (abuf_pending(&c->head) + more <= c->loop->g->limits.max_header_bytes)
        return 0;
    c->early_status = 431;
    gw_count(c->loop->g, GW_C_HEADERS_TOO_LARGE, 1);
    return 1;
}

static int on_message_begin(llhttp_t *p)
{
    gw_conn *c = p->data;
    request_reset(c);
    c->cfg = gw_current_config(c->loop->g);
    snprintf(c->request_id, sizeof(c->request_id), "%016llx", (unsigned long long)rng_next(c->loop));
    c->state = ST_HEAD;
    http1_deadline(c, DL_HEAD, c->loop->g->limits.header_timeout_ms);
    gw_count(c->loop->g, GW_C_REQUESTS, 1);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    gw_conn *c = p->data;
    if (over_head_limit(c, len))
        return -1;
    abuf_append(&c->head, at, len);
    c->url_len += len;
    return 0;
}

int hdr_list_field(hdr_list *l, abuf *store, const char *at, size_t len)
{
    if (l->n == 0 || l->in_value) { /* a new field begins */
        if (l->n == l->cap) {
            int cap = l->cap ? l->cap * 2 : 32;
            hdr *h = realloc(l->v, sizeof(*h) * (size_t)cap);
            if (!h)
                return -1;
            l->v = h;
            l->cap = cap;
        }
        l->v[l->n++] = (hdr){.name_off = store->len, .val_off = store->len};
        l->in_value = 0;
    }
    abuf_append(store, at, len);
    l->v[l->n - 1].name_len += len;
    return 0;
}

void hdr_list_value(hdr_list *l, abuf *store, const char *at, size_t len)
{
    hdr *h = &l->v[l->n - 1];
    if (!l->in_value) {
        l->in_value = 1;
        h->val_off = store->len;
    }
    abuf_append(store, at, len);
    h->val_len += len;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    gw_conn *c = p->data;
    if (over_head_limit(c, len))
        return -1;
    if ((c->hdrs.n == 0 || c->hdrs.in_value) && c->hdrs.n >= c->loop->g->limits.max_headers) {
        c->early_status = 431;
        gw_count(c->loop->g, GW_C_HEADERS_TOO_LARGE, 1);
        return -1;
    }
    return hdr_list_field(&c->hdrs, &c->head, at, len);
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    gw_conn *c = p->data;
    if (over_head_limit(c, len))
        return -1;
    hdr_list_value(&c->hdrs, &c->head, at, len);
    return 0;
}

/* The path used for routing: origin-form up to '?' or '#'; absolute-form without scheme and authority;
 * "*" (OPTIONS) routes as "/". */
static const char *route_path(gw_conn *c, size_t *len, const char **auth, size_t *auth_len)
{
    const char *u = c->head.data, *end = u + c->url_len;
    *auth = NULL;
    *auth_len = 0;
    const char *sep = c->url_len > 8 ? strstr(u, "://") : NULL;
    if (sep && sep < end && u[0] != '/') {
        const char *a = sep + 3, *slash = a;
        while (slash < end && *slash != '/' && *slash != '?')
            slash++;
        *auth = a;
        *auth_len = (size_t)(slash - a);
        u = slash;
    }
    const char *q = u;
    while (q < end && *q != '?' && *q != '#')
        q++;
    if (q == u || u[0] != '/') {
        *len = 1;
        return "/";
    }
    *len = (size_t)(q - u);
    return u;
}

/* The path as a backend resolves it, for routing only (the request goes on as received): "%2e" decoded to
 * ".", "." and ".." segments removed (RFC 3986 5.2.4), repeated slashes merged. Otherwise
 * "/public/../admin" would match a "/public" route (and its WAF policy) while the backend serves /admin.
 * Writes into out (at least len + 1 bytes); returns the new length. */
static size_t normalize_path(const char *in, size_t len, char *out)
{
    size_t n = 0, i = 0;
    while (i < len) {
        /* one segment: in[i] is '/' */
        size_t j = i + 1;
        char seg[4];
        size_t sl = 0, start = j;
        while (j < len && in[j] != '/') {
            int dot = in[j] == '.' || (j + 2 < len && in[j] == '%' && in[j + 1] == '2' &&
                                       (in[j + 2] == 'e' || in[j + 2] == 'E'));
            if (sl < 3)
                seg[sl] = dot ? '.' : 'x';
            sl++;
            j += dot && in[j] == '%' ? 3 : 1;
        }
        int is_dot = sl == 1 && seg[0] == '.', is_dotdot = sl == 2 && seg[0] == '.' && seg[1] == '.';
        if (is_dotdot) {
            while (n > 0 && out[n - 1] != '/') /* drop the last segment */
                n--;
            if (n > 0)
                n--;
        } else if (!is_dot && j > start) {
            out[n++] = '/';
            for (size_t k = start; k < j; k++)
                out[n++] = in[k];
        }
        if (j == len && (is_dot || is_dotdot || j == start)) /* "/a/." and "/a/" keep the trailing slash */
            out[n++] = '/';
        i = j;
    }
    if (n == 0)
        out[n++] = '/';
    out[n] = 0;
    return n;
}

static size_t host_only(const char *h, size_t len)
{
    if (len && h[0] == '[') { /* [v6]:port */
        const char *close = memchr(h, ']', len);
        return close ? (size_t)(close - h + 1) : len;
    }
    const char *colon = memchr(h, ':', len);
    return colon ? (size_t)(colon - h) : len;
}

static void waf_inspect_head(gw_conn *c)
{
    const gw_route *r = c->route;
    char method[24], version[8], *uri = strndup(c->head.data, c->url_len);
    snprintf(method, sizeof(method), "%s", llhttp_method_name(c->parser.method));
    snprintf(version, sizeof(version), "%d.%d", c->parser.http_major, c->parser.http_minor);
    c->tx = uri ? waf_begin(r->waf, &c->verdict, c->request_id, c->client_ip, c->client_port, c->local_ip,
                            c->local_port, method, uri, version)
                : NULL;
    free(uri);
    if (!c->tx) {
        if (r->waf_mode == GW_WAF_BLOCK) { /* fail closed */
            c->early_status = 403;
            c->early_action = GW_ACTION_ERROR;
        } else {
            record(c, GW_ACTION_ERROR, 0, "WAF transaction failed; forwarded (detect-only route)");
        }
        return;
    }
    for (int i = 0; i < c->hdrs.n; i++)
        waf_header(c->tx, hdr_name(c, &c->hdrs.v[i]), c->hdrs.v[i].name_len, hdr_val(c, &c->hdrs.v[i]),
                   c->hdrs.v[i].val_len);
    if (waf_headers_done(c->tx, &c->verdict) && r->waf_mode == GW_WAF_BLOCK) {
        c->early_status = c->verdict.status;
        c->early_action = GW_ACTION_BLOCKED;
    }
}

static int on_headers_complete(llhttp_t *p)
{
    gw_conn *c = p->data;
    abuf_append(&c->head, "", 1); /* NUL after the last byte: strstr/strndup stay inside */
    c->head.len--;
    c->is_head = p->method == HTTP_HEAD;
    c->req_keepalive = llhttp_should_keep_alive(p);
    int hosts = 0;
    for (int i = 0; i < c->hdrs.n; i++)
        hosts += c->hdrs.v[i].name_len == 4 && strncasecmp(hdr_name(c, &c->hdrs.v[i]), "host", 4) == 0;
    if (hosts > 1) { /* RFC 9112 3.2: 400; routing by one and the backend using another is a bypass */
        gw_count(c->loop->g, GW_C_BAD_REQUESTS, 1);
        c->early_status = 400;
        return -1;
    }
    size_t plen, alen, hl = 0;
    const char *auth;
    const char *raw_path = route_path(c, &plen, &auth, &alen);
    char *path = malloc(plen + 2);
    if (!path) {
        c->early_status = 503;
        return -1;
    }
    plen = normalize_path(raw_path, plen, path);
    const char *host = auth ? auth : find_header(c, "host", &hl);
    if (auth)
        hl = alen;
    hl = host ? host_only(host, hl) : 0;
    c->route = config_match(c->cfg, c->listener_id, llhttp_method_name(p->method), host ? host : "", hl,
                            path, plen, find_header, c);
    free(path);
    if (!c->route) {
        gw_count(c->loop->g, GW_C_NO_ROUTE, 1);
        c->early_status = 404;
        return -1;
    }
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->route->max_body) {
        gw_count(c->loop->g, GW_C_BODY_TOO_LARGE, 1);
        c->early_status = 413;
        return -1;
    }
    if (c->route->waf && c->route->waf_mode != GW_WAF_OFF) {
        waf_inspect_head(c);
        if (c->early_status)
            return -1;
    }
    size_t el;
    const char *expect = find_header(c, "expect", &el);
    if (expect && el == 12 && strncasecmp(expect, "100-continue", 12) == 0 && p->http_minor == 1)
        abuf_append(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    c->state = ST_BODY;
    http1_deadline(c, DL_BODY, c->loop->g->limits.body_timeout_ms);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    gw_conn *c = p->data;
    if (abuf_pending(&c->body) + len > c->route->max_body) {
        gw_count(c->loop->g, GW_C_BODY_TOO_LARGE, 1);
        c->early_status = 413;
        return -1;
    }
    if (abuf_append(&c->body, at, len) < 0) {
        c->early_status = 503;
        return -1;
    }
    if (c->tx)
        waf_body(c->tx, at, len);
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    (void)p;
    return HPE_PAUSED; /* one request at a time: the rest of the input waits */
}

static void settings_init(void)
{
    llhttp_settings_init(&req_settings);
    req_settings.on_message_begin = on_message_begin;
    req_settings.on_url = on_url;
    req_settings.on_header_field = on_header_field;
    req_settings.on_header_value = on_header_value;
    req_settings.on_headers_complete = on_headers_complete;
    req_settings.on_body = on_body;
    req_settings.on_message_complete = on_message_complete;
}

/* WAF phase 2, then forward (or answer). Called once the whole request is in. */
static void request_ready(gw_conn *c)
{
    c->state = ST_WAIT;
    http1_deadline(c, DL_NONE, 0);
    const gw_route *r = c->route;
    int action = GW_ACTION_ALLOWED;
    if (c->tx) {
        int hit = waf_body_done(c->tx, &c->verdict);
        waf_end(c->tx);
        c->tx = NULL;
        if (hit && r->waf_mode == GW_WAF_BLOCK) {
            http1_respond(c, c->verdict.status, GW_ACTION_BLOCKED, NULL);
            return;
        }
        if (c->verdict.nrules && r->waf_mode == GW_WAF_DETECT)
            action = GW_ACTION_DETECTED;
    }
    record(c, action, 0, "forwarded");
    if (r->backend < 0) {
        http1_respond(c, 500, GW_ACTION_ALLOWED, "route has no backend");
        return;
    }
    upstream_start(c);
}

/* The response is complete: pool the upstream connection, and go on with the client's next request. */
void http1_exchange_done(gw_conn *c, gw_upstream *u)
{
    int keep = !u->eof && llhttp_should_keep_alive(&u->parser);
    c->up = NULL;
    u->conn = NULL;
    gw_count(c->loop->g, GW_C_RESPONSES, 1);
    if (keep)
        upstream_pool_put(c->loop, u);
    else
        upstream_kill(u);
    if (!keep || !c->req_keepalive)
        c->closing = 1;
    request_reset(c);
    c->state = ST_HEAD;
    http1_deadline(c, DL_IDLE, c->loop->g->limits.idle_timeout_ms);
    llhttp_resume(&c->parser);
    conn_drive(c);
}


/* ---------- client side ---------- */

static void parse_input(gw_conn *c)
{
    llhttp_errno_t err = llhttp_execute(&c->parser, abuf_head(&c->in), abuf_pending(&c->in));
    if (err == HPE_OK) {
        abuf_clear(&c->in);
        return;
    }
    if (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE) {
        abuf_consume(&c->in, (size_t)(llhttp_get_error_pos(&c->parser) - abuf_head(&c->in)));
        if (err == HPE_PAUSED_UPGRADE) /* no protocol switch through the gateway: close after this one */
            c->req_keepalive = 0;
        request_ready(c);
        return;
    }
    abuf_clear(&c->in);
    if (c->early_status == 404) {
        http1_respond(c, 404, GW_ACTION_ALLOWED, "no route");
        return;
    }
    if (c->early_status) {
        const char *why = c->early_status == 413   ? "request body over the route's limit"
                          : c->early_status == 431 ? "request head over the header limits"
                          : c->early_status == 400 ? "more than one Host header"
                                                   : NULL;
        http1_respond(c, c->early_status, c->early_action ? c->early_action : GW_ACTION_REFUSED, why);
        return;
    }
    gw_count(c->loop->g, GW_C_BAD_REQUESTS, 1);
    if (!c->request_id[0])
        snprintf(c->request_id, sizeof(c->request_id), "%016llx", (unsigned long long)rng_next(c->loop));
    http1_respond(c, 400, GW_ACTION_REFUSED, llhttp_get_error_reason(&c->parser));
}

/* An HTTP/2 connection: every byte read goes to nghttp2 (h2.c), which feeds the streams' requests. */
static void h2_drive(gw_conn *c)
{
    char buf[GW_READ_CHUNK];
    for (;;) {
        ssize_t n = client_read(c, buf, sizeof(buf));
        if (n == -2)
            break;
        if (n <= 0 || h2_feed(c, buf, (size_t)n) < 0) {
            http1_kill(c);
            return;
        }
        gw_count(c->loop->g, GW_C_BYTES_IN, (uint64_t)n);
        http1_deadline(c, DL_IDLE, c->loop->g->limits.idle_timeout_ms);
        if (c->dead)
            return;
    }
    if (h2_send(c) < 0 || http1_flush_socket(c) < 0 || h2_wants_close(c))
        http1_kill(c);
}

/* Prior knowledge (RFC 9113 3.3) on a plain listener, or ALPN h2 after the TLS handshake. */
static int h2_begin(gw_conn *c)
{
    if (h2_start(c) < 0) {
        http1_kill(c);
        return -1;
    }
    http1_deadline(c, DL_IDLE, c->loop->g->limits.idle_timeout_ms);
    return 0;
}

static int h2_preface_seen(gw_conn *c)
{
    size_t n = abuf_pending(&c->in);
    if (c->ssl || c->request_id[0] || n == 0) /* only as the first bytes of a plain connection */
        return 0;
    if (memcmp(abuf_head(&c->in), H2_PREFACE, n < 24 ? n : 24) != 0)
        return 0;
    return n >= 24 ? 1 : -1; /* -1: could still be the preface, wait for more */
}

static void conn_drive(gw_conn *c)
{
    if (c->dead)
        return;
    if (c->handshaking) {
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                gw_count(c->loop->g, GW_C_TLS_ERRORS, 1);
                http1_kill(c);
            }
            return;
        }
        c->handshaking = 0;
        gw_count(c->loop->g, GW_C_TLS_HANDSHAKES, 1);
        const unsigned char *proto;
        unsigned int plen;
        SSL_get0_alpn_selected(c->ssl, &proto, &plen);
        if (plen == 2 && memcmp(proto, "h2", 2) == 0 && h2_begin(c) < 0)
            return;
    }
    if (c->h2) {
        h2_drive(c);
        return;
    }
    if (http1_flush(c) < 0) {
        http1_kill(c);
        return;
    }
    if (c->closing) {
        if (!abuf_pending(&c->out))
            http1_kill(c);
        return;
    }
    if (c->up && abuf_pending(&c->out) < GW_OUT_HIGH) /* the client drained: read more of the response */
        upstream_drive(c->up);
    if (c->dead || c->state == ST_WAIT)
        return;
    if (abuf_pending(&c->in)) { /* a pipelined request left by the previous exchange */
        parse_input(c);
        if (c->dead || c->state == ST_WAIT) {
            return;
        }
    }
    char buf[GW_READ_CHUNK];
    while (!c->dead && c->state != ST_WAIT) {
        ssize_t n = client_read(c, buf, sizeof(buf));
        if (n == -2)
            break;
        if (n <= 0) { /* EOF or error: a half-received request cannot be answered usefully */
            http1_kill(c);
            return;
        }
        gw_count(c->loop->g, GW_C_BYTES_IN, (uint64_t)n);
        abuf_append(&c->in, buf, (size_t)n);
        int pri = h2_preface_seen(c);
        if (pri < 0)
            continue;
        if (pri > 0) {
            if (h2_begin(c) < 0)
                return;
            size_t len = abuf_pending(&c->in);
            char *data = malloc(len);
            if (data)
                memcpy(data, abuf_head(&c->in), len);
            abuf_clear(&c->in);
            int bad = !data || h2_feed(c, data, len) < 0;
            free(data);
            if (bad)
                http1_kill(c);
            else
                h2_drive(c);
            return;
        }
        parse_input(c);
    }
    if (!c->dead && http1_flush(c) < 0)
        http1_kill(c);
}

void http1_drive(gw_conn *c)
{
    conn_drive(c);
}

void http1_push_input(gw_conn *c, const char *data, size_t len)
{
    if (c->dead)
        return;
    if (abuf_append(&c->in, data, len) < 0) {
        http1_kill(c);
        return;
    }
    if (c->state != ST_WAIT)
        parse_input(c);
    conn_drive(c);
}

/* A new request-side connection: its parser, the loop's list (deadline scans), the head deadline. */
static void conn_register(gw_loop *l, gw_conn *c)
{
    llhttp_init(&c->parser, HTTP_REQUEST, &req_settings);
    c->parser.data = c;
    c->next = l->conns;
    if (l->conns)
        l->conns->prev = c;
    l->conns = c;
    http1_deadline(c, DL_HEAD, l->g->limits.header_timeout_ms);
}

gw_conn *http1_stream_conn(gw_conn *parent, h2_stream *st)
{
    gw_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    gw_loop *l = parent->loop;
    c->ep.kind = EP_CLIENT;
    c->loop = l;
    c->fd = -1;
    c->stream = st;
    c->listener_id = parent->listener_id;
    c->is_tls = parent->is_tls;
    c->client_port = parent->client_port;
    c->local_port = parent->local_port;
    memcpy(c->client_ip, parent->client_ip, sizeof(c->client_ip));
    memcpy(c->local_ip, parent->local_ip, sizeof(c->local_ip));
    conn_register(l, c);
    return c;
}

void http1_client_event(gw_conn *c, uint32_t events)
{
    (void)events;
    conn_drive(c);
}

void http1_accept(gw_loop *l, int fd, int listener_id, const struct sockaddr_storage *peer)
{
    pthread_once(&settings_once, settings_init);
    gw_config *cfg = gw_current_config(l->g);
    int found = 0;
    gw_tls *tls = cfg ? config_listener_tls(cfg, listener_id, &found) : NULL;
    gw_conn *c = found ? calloc(1, sizeof(*c)) : NULL;
    SSL *ssl = c && tls ? SSL_new(tls->ctx) : NULL;
    gw_config_release(cfg);
    if (!c || (tls && !ssl)) { /* no config for this listener yet, or out of memory */
        gw_count(l->g, GW_C_CONNS_REFUSED, 1);
        free(c);
        close(fd);
        return;
    }
    c->ep.kind = EP_CLIENT;
    c->loop = l;
    c->fd = fd;
    c->listener_id = listener_id;
    c->ssl = ssl;
    c->is_tls = ssl != NULL;
    if (ssl) {
        SSL_set_fd(ssl, fd);
        SSL_set_accept_state(ssl);
        c->handshaking = 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    addr_text(peer, c->client_ip, &c->client_port);
    struct sockaddr_storage local;
    socklen_t ll = sizeof(local);
    if (getsockname(fd, (struct sockaddr *)&local, &ll) == 0)
        addr_text(&local, c->local_ip, &c->local_port);
    conn_register(l, c);
    atomic_fetch_add(&l->g->conns, 1);
    gw_count(l->g, GW_C_CONNS_ACTIVE, 1);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        http1_kill(c);
        return;
    }
    conn_drive(c);
}

void http1_tick(gw_loop *l, uint64_t now)
{
    for (gw_conn *c = l->conns, *next; c; c = next) {
        next = c->next;
        if (c->deadline_kind == DL_NONE || now < c->deadline)
            continue;
        int kind = c->deadline_kind;
        c->deadline_kind = DL_NONE;
        if (kind == DL_IDLE || c->closing || (kind == DL_HEAD && !c->cfg)) {
            http1_kill(c); /* idle keep-alive, a stalled handshake, or an answer nobody reads */
        } else if (kind == DL_UPSTREAM) {
            gw_count(l->g, GW_C_UPSTREAM_TIMEOUTS, 1);
            if (c->up && c->up->got_bytes) {
                http1_kill(c);
            } else {
                http1_respond(c, 504, GW_ACTION_ALLOWED, "upstream timed out");
            }
        } else {
            gw_count(l->g, GW_C_TIMEOUTS, 1);
            http1_respond(c, 408, GW_ACTION_REFUSED, "request timed out");
        }
    }
    upstream_pool_expire(l, now);
}

void http1_close_all(gw_loop *l)
{
    while (l->conns)
        http1_kill(l->conns);
    upstream_pool_expire(l, UINT64_MAX);
    http1_reap();
}
