/* Backend connections for http1.c's requests: plain TCP connects, sockets handed in for external backends
 * (HBONE streams made by Python), a keep-alive pool per loop, the request re-framed for the backend
 * (Content-Length, hop-by-hop headers dropped, X-Forwarded-*, X-Request-Id) and the response relayed as
 * received while llhttp finds its end. Objects are freed only by upstream_reap, after the epoll batch. */
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

/* idle upstream connections are kept 15 s: backends commonly drop idle keep-alives after 20 s+ */
#define GW_IDLE_KEEP_MS 15000

static llhttp_settings_t resp_settings;
static pthread_once_t resp_once = PTHREAD_ONCE_INIT;
static __thread gw_upstream *dead_ups;

static void resp_settings_init(void);

void upstream_kill(gw_upstream *u)
{
    if (u->dead)
        return;
    u->dead = 1;
    close(u->fd); /* also removes it from epoll */
    u->next = dead_ups;
    dead_ups = u;
}

static int resp_on_headers_complete(llhttp_t *p)
{
    gw_upstream *u = p->data;
    return u->conn && u->conn->is_head ? 1 : 0; /* a HEAD response has no body whatever it says */
}

static int resp_on_message_complete(llhttp_t *p)
{
    gw_upstream *u = p->data;
    if (p->status_code >= 100 && p->status_code < 200 && p->status_code != 101)
        return 0; /* an interim response: the final one follows on the same parser */
    u->resp_done = 1;
    return HPE_PAUSED;
}

static int hop_by_hop(const char *name, size_t len)
{
    static const char *const names[] = {"connection", "keep-alive", "proxy-connection", "te",
                                        "transfer-encoding", "upgrade", "trailer", "content-length",
                                        "expect", "x-request-id", "x-forwarded-proto", NULL};
    for (int i = 0; names[i]; i++)
        if (strlen(names[i]) == len && strncasecmp(names[i], name, len) == 0)
            return 1;
    return 0;
}

static void build_request(gw_conn *c, abuf *out)
{
    char line[256];
    const char *method = llhttp_method_name(c->parser.method);
    abuf_append(out, method, strlen(method));
    abuf_append(out, " ", 1);
    abuf_append(out, c->head.data, c->url_len);
    abuf_append(out, " HTTP/1.1\r\n", 11);
    size_t xff_len = 0;
    const char *xff = NULL;
    for (int i = 0; i < c->hdrs.n; i++) {
        const hdr *h = &c->hdrs.v[i];
        if (hop_by_hop(hdr_name(c, h), h->name_len))
            continue;
        if (h->name_len == 15 && strncasecmp(hdr_name(c, h), "x-forwarded-for", 15) == 0) {
            xff = hdr_val(c, h);
            xff_len = h->val_len;
            continue;
        }
        abuf_append(out, hdr_name(c, h), h->name_len);
        abuf_append(out, ": ", 2);
        abuf_append(out, hdr_val(c, h), h->val_len);
        abuf_append(out, "\r\n", 2);
    }
    int n = snprintf(line, sizeof(line), "x-forwarded-for: %.*s%s%s\r\nx-forwarded-proto: %s\r\n"
                     "x-request-id: %s\r\n", (int)(xff_len > 128 ? 128 : xff_len), xff ? xff : "",
                     xff ? ", " : "", c->client_ip, c->is_tls ? "https" : "http", c->request_id);
    abuf_append(out, line, (size_t)n);
    if (abuf_pending(&c->body) || (c->parser.flags & (F_CONTENT_LENGTH | F_CHUNKED))) {
        n = snprintf(line, sizeof(line), "content-length: %zu\r\n", abuf_pending(&c->body));
        abuf_append(out, line, (size_t)n);
    }
    abuf_append(out, "\r\n", 2);
    abuf_append(out, abuf_head(&c->body), abuf_pending(&c->body));
}

static int same_addr(const gw_upstream *u, const struct sockaddr_storage *a, socklen_t len)
{
    return u->addrlen == len && memcmp(&u->addr, a, len) == 0;
}

static gw_upstream *pool_take(gw_loop *l, const struct sockaddr_storage *a, socklen_t len)
{
    for (gw_upstream **pp = &l->idle; *pp; pp = &(*pp)->next)
        if (same_addr(*pp, a, len)) {
            gw_upstream *u = *pp;
            *pp = u->next;
            u->next = NULL;
            l->nidle--;
            return u;
        }
    return NULL;
}

static void pool_remove(gw_loop *l, gw_upstream *u)
{
    for (gw_upstream **pp = &l->idle; *pp; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            l->nidle--;
            return;
        }
}

static int pool_count(gw_loop *l, const gw_upstream *like)
{
    int n = 0;
    for (gw_upstream *u = l->idle; u; u = u->next)
        n += same_addr(u, &like->addr, like->addrlen);
    return n;
}

/* An upstream object around a connected (or connecting) socket, registered with the loop. */
static gw_upstream *up_wrap(gw_loop *l, int fd, const struct sockaddr_storage *a, socklen_t len)
{
    gw_upstream *u = calloc(1, sizeof(*u));
    if (!u) {
        close(fd);
        return NULL;
    }
    u->ep.kind = EP_UPSTREAM;
    u->loop = l;
    u->fd = fd;
    u->addr = *a;
    u->addrlen = len;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = u};
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        close(fd);
        free(u);
        return NULL;
    }
    return u;
}

static gw_upstream *up_connect(gw_loop *l, const struct sockaddr_storage *a, socklen_t len)
{
    int fd = socket(a->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (const struct sockaddr *)a, len) < 0 && errno != EINPROGRESS) {
        close(fd);
        return NULL;
    }
    gw_upstream *u = up_wrap(l, fd, a, len);
    if (u)
        gw_count(l->g, GW_C_UPSTREAM_CONNECTS, 1);
    return u;
}

static void upstream_attach(gw_conn *c, gw_upstream *u)
{
    u->conn = c;
    c->up = u;
    u->resp_done = u->got_bytes = u->eof = 0;
    abuf_clear(&u->out);
    build_request(c, &u->out);
    pthread_once(&resp_once, resp_settings_init);
    llhttp_init(&u->parser, HTTP_RESPONSE, &resp_settings);
    u->parser.data = u;
    http1_deadline(c, DL_UPSTREAM, c->loop->g->limits.upstream_timeout_ms);
    upstream_drive(u);
}

/* An external backend: Python makes the connection (e.g. an HBONE stream into the mesh). */
static void upstream_request(gw_conn *c, const gw_backend *b)
{
    gw_loop *l = c->loop;
    c->await_token = (++l->next_token << 8) | (uint64_t)l->index;
    gw_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.kind = GW_EVENT_UPSTREAM;
    ev.provider = b->provider;
    ev.token = c->await_token;
    memcpy(ev.request_id, c->request_id, sizeof(ev.request_id));
    snprintf(ev.client, sizeof(ev.client), "%s:%d", c->client_ip, c->client_port);
    gw_emit(l->g, &ev);
    http1_deadline(c, DL_UPSTREAM, l->g->limits.upstream_timeout_ms);
}

void http1_upstream_ready(gw_loop *l, uint64_t token, int fd)
{
    gw_conn *c = l->conns;
    while (c && (c->dead || c->await_token != token))
        c = c->next;
    if (!c) { /* the request is gone (timed out, client left) */
        if (fd >= 0)
            close(fd);
        return;
    }
    c->await_token = 0;
    const gw_backend *b = &c->cfg->backends[c->route->backend];
    gw_upstream *u = fd >= 0 ? up_wrap(l, fd, &b->addrs[0], b->addrlens[0]) : NULL;
    if (!u) {
        gw_count(l->g, GW_C_UPSTREAM_ERRORS, 1);
        http1_respond(c, 502, GW_ACTION_ALLOWED, "backend connection failed");
        return;
    }
    gw_count(l->g, GW_C_UPSTREAM_CONNECTS, 1);
    upstream_attach(c, u);
}

void upstream_start(gw_conn *c)
{
    gw_loop *l = c->loop;
    const gw_backend *b = &c->cfg->backends[c->route->backend];
    int i = b->provider >= 0 ? 0 : (int)(l->rr++ % (unsigned)b->naddrs);
    gw_upstream *u = c->retried ? NULL : pool_take(l, &b->addrs[i], b->addrlens[i]);
    if (u) {
        u->reused = 1;
        gw_count(l->g, GW_C_UPSTREAM_REUSED, 1);
    } else if (b->provider >= 0) {
        upstream_request(c, b);
        return;
    } else {
        u = up_connect(l, &b->addrs[i], b->addrlens[i]);
    }
    if (!u) {
        gw_count(l->g, GW_C_UPSTREAM_ERRORS, 1);
        http1_respond(c, 502, GW_ACTION_ALLOWED, "upstream connect failed");
        return;
    }
    upstream_attach(c, u);
}

static void upstream_failed(gw_upstream *u, const char *why)
{
    gw_conn *c = u->conn;
    if (!c) { /* idle: the backend closed it */
        pool_remove(u->loop, u);
        upstream_kill(u);
        return;
    }
    c->up = NULL;
    upstream_kill(u);
    if (u->got_bytes) { /* part of the response is already on its way: all we can do is close */
        gw_count(c->loop->g, GW_C_UPSTREAM_ERRORS, 1);
        c->closing = 1;
        if (http1_flush(c) < 0 || !abuf_pending(&c->out))
            http1_kill(c);
        return;
    }
    if (u->reused && !c->retried) { /* a pooled connection the backend had closed: one fresh try */
        c->retried = 1;
        upstream_start(c);
        return;
    }
    gw_count(c->loop->g, GW_C_UPSTREAM_ERRORS, 1);
    http1_respond(c, 502, GW_ACTION_ALLOWED, why);
}

void upstream_drive(gw_upstream *u)
{
    gw_conn *c = u->conn;
    if (u->dead)
        return;
    if (!c) { /* an idle pooled connection had an event: drop it if the backend closed it or sent junk */
        char probe;
        ssize_t n = recv(u->fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return; /* only writable again (edge-triggered EPOLLOUT): still a good connection */
        upstream_failed(u, "idle");
        return;
    }
    while (abuf_pending(&u->out)) {
        ssize_t w = send(u->fd, abuf_head(&u->out), abuf_pending(&u->out), MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            upstream_failed(u, strerror(errno));
            return;
        }
        abuf_consume(&u->out, (size_t)w);
    }
    char buf[GW_READ_CHUNK];
    while (!u->resp_done && abuf_pending(&c->out) < GW_OUT_HIGH) {
        ssize_t n = read(u->fd, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            upstream_failed(u, strerror(errno));
            return;
        }
        if (n == 0) {
            u->eof = 1;
            if (u->got_bytes && llhttp_finish(&u->parser) == HPE_OK && llhttp_message_needs_eof(&u->parser))
                u->resp_done = 1; /* a response delimited by the connection's end */
            else if (u->got_bytes && u->resp_done == 0 && llhttp_get_errno(&u->parser) == HPE_OK)
                u->resp_done = 1; /* finish() completed it */
            if (!u->resp_done) {
                upstream_failed(u, "upstream closed before a complete response");
                return;
            }
            break;
        }
        u->got_bytes = 1;
        http1_deadline(c, DL_UPSTREAM, c->loop->g->limits.upstream_timeout_ms);
        llhttp_errno_t err = llhttp_execute(&u->parser, buf, (size_t)n);
        size_t keep = (size_t)n;
        if (err == HPE_PAUSED)
            keep = (size_t)(llhttp_get_error_pos(&u->parser) - buf);
        else if (err != HPE_OK) {
            upstream_failed(u, llhttp_get_error_reason(&u->parser));
            return;
        }
        abuf_append(&c->out, buf, keep);
        if (keep < (size_t)n)
            u->eof = 1; /* bytes after the response: the connection is not reusable */
    }
    if (http1_flush(c) < 0) {
        http1_kill(c);
        return;
    }
    /* handing the response to an h2 stream can end the stream, and with it this exchange */
    if (u->resp_done && !c->dead && !u->dead)
        http1_exchange_done(c, u);
}

void http1_upstream_event(gw_upstream *u, uint32_t events)
{
    (void)events;
    upstream_drive(u);
}

static void resp_settings_init(void)
{
    llhttp_settings_init(&resp_settings);
    resp_settings.on_headers_complete = resp_on_headers_complete;
    resp_settings.on_message_complete = resp_on_message_complete;
}

void upstream_pool_put(gw_loop *l, gw_upstream *u)
{
    if (pool_count(l, u) >= GW_IDLE_POOL) {
        upstream_kill(u);
        return;
    }
    u->idle_since = gw_now_ms();
    u->next = l->idle;
    l->idle = u;
    l->nidle++;
}

void upstream_pool_expire(gw_loop *l, uint64_t now)
{
    for (gw_upstream *u = l->idle, *next; u; u = next) {
        next = u->next;
        if (now == UINT64_MAX || now - u->idle_since > GW_IDLE_KEEP_MS) {
            pool_remove(l, u);
            upstream_kill(u);
        }
    }
}

void upstream_reap(void)
{
    while (dead_ups) {
        gw_upstream *u = dead_ups;
        dead_ups = u->next;
        abuf_free(&u->out);
        free(u);
    }
}
