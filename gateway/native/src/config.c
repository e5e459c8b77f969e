/* The gateway's routing table: listeners (plain or TLS), backends (address lists) and routes, built by
 * Python, immutable once applied and shared by reference between the loops. Route order is precedence. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

gw_config *gw_config_new(void)
{
    gw_config *c = calloc(1, sizeof(*c));
    if (c)
        atomic_init(&c->refs, 1);
    return c;
}

gw_config *config_retain(gw_config *c)
{
    if (c)
        atomic_fetch_add(&c->refs, 1);
    return c;
}

void gw_config_release(gw_config *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    for (int i = 0; i < c->nlisteners; i++)
        gw_tls_release(c->listeners[i].tls);
    for (int i = 0; i < c->nroutes; i++) {
        gw_route *r = &c->routes[i];
        free(r->hostname);
        free(r->path);
        free(r->name);
        free(r->method);
        for (int h = 0; h < r->nheaders; h++) {
            free(r->headers[h].name);
            free(r->headers[h].value);
        }
        free(r->headers);
        gw_waf_release(r->waf);
    }
    free(c->listeners);
    free(c->backends);
    free(c->routes);
    free(c);
}

int gw_config_listener(gw_config *c, int listener_id, gw_tls *tls)
{
    gw_listener_cfg *l = realloc(c->listeners, sizeof(*l) * (size_t)(c->nlisteners + 1));
    if (!l)
        return -1;
    c->listeners = l;
    l[c->nlisteners].listener_id = listener_id;
    l[c->nlisteners].tls = tls_retain(tls);
    c->nlisteners++;
    return 0;
}

gw_tls *config_listener_tls(const gw_config *c, int listener_id, int *found)
{
    for (int i = 0; i < c->nlisteners; i++)
        if (c->listeners[i].listener_id == listener_id) {
            *found = 1;
            return c->listeners[i].tls;
        }
    *found = 0;
    return NULL;
}

static int parse_addr(const char *text, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || colon == text || (size_t)(colon - text) >= sizeof(host))
        return -1;
    size_t hl = (size_t)(colon - text);
    memcpy(host, text, hl);
    host[hl] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 1 || port > 65535)
        return -1;
    memset(ss, 0, sizeof(*ss));
    if (host[0] == '[' && host[hl - 1] == ']') {
        host[hl - 1] = 0;
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*a6);
        return inet_pton(AF_INET6, host + 1, &a6->sin6_addr) == 1 ? 0 : -1;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    *len = sizeof(*a4);
    return inet_pton(AF_INET, host, &a4->sin_addr) == 1 ? 0 : -1;
}

static int add_backend(gw_config *c, const gw_backend *b, char *err, size_t errlen)
{
    gw_backend *nb = realloc(c->backends, sizeof(*nb) * (size_t)(c->nbackends + 1));
    if (!nb) {
        gw_errf(err, errlen, "out of memory");
        return -1;
    }
    c->backends = nb;
    nb[c->nbackends] = *b;
    return c->nbackends++;
}

int gw_config_backend_external(gw_config *c, int provider, char *err, size_t errlen)
{
    gw_backend b = {.provider = provider};
    if (provider < 0 || provider > 65535) {
        gw_errf(err, errlen, "provider id %d out of range", provider);
        return -1;
    }
    /* pooled idle connections are matched by address: a provider's is AF_UNSPEC + its id */
    b.addrs[0].ss_family = AF_UNSPEC;
    memcpy((char *)&b.addrs[0] + sizeof(sa_family_t), &provider, sizeof(provider));
    b.addrlens[0] = sizeof(sa_family_t) + sizeof(provider);
    return add_backend(c, &b, err, errlen);
}

int gw_config_backend(gw_config *c, const char *addrs, char *err, size_t errlen)
{
    gw_backend b = {.provider = -1};
    char *copy = strdup(addrs), *save = NULL;
    for (char *tok = strtok_r(copy, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        if (b.naddrs == GW_MAX_BACKEND_ADDRS) {
            gw_errf(err, errlen, "more than %d addresses", GW_MAX_BACKEND_ADDRS);
            free(copy);
            return -1;
        }
        if (parse_addr(tok, &b.addrs[b.naddrs], &b.addrlens[b.naddrs]) < 0) {
            gw_errf(err, errlen, "bad backend address %.64s (want ip:port)", tok);
            free(copy);
            return -1;
        }
        b.naddrs++;
    }
    free(copy);
    if (!b.naddrs) {
        gw_errf(err, errlen, "backend without addresses");
        return -1;
    }
    return add_backend(c, &b, err, errlen);
}

static int parse_headers(gw_route *r, const char *spec)
{
    for (const char *p = spec; *p;) {
        const char *nl1 = strchr(p, '\n');
        const char *nl2 = nl1 ? strchr(nl1 + 1, '\n') : NULL;
        if (!nl2)
            return -1;
        gw_header_match *h = realloc(r->headers, sizeof(*h) * (size_t)(r->nheaders + 1));
        if (!h)
            return -1;
        r->headers = h;
        h[r->nheaders].name = strndup(p, (size_t)(nl1 - p));
        h[r->nheaders].value = strndup(nl1 + 1, (size_t)(nl2 - nl1 - 1));
        r->nheaders++;
        p = nl2 + 1;
    }
    return 0;
}

int gw_config_route(gw_config *c, const gw_route_spec *s, char *err, size_t errlen)
{
    if (s->stat_slot < 0 || s->stat_slot >= GW_MAX_ROUTE_SLOTS) {
        gw_errf(err, errlen, "stat slot %d out of range", s->stat_slot);
        return -1;
    }
    if (s->backend >= c->nbackends) {
        gw_errf(err, errlen, "unknown backend %d", s->backend);
        return -1;
    }
    if (!s->path || s->path[0] != '/') {
        gw_errf(err, errlen, "path must start with /");
        return -1;
    }
    gw_route *nr = realloc(c->routes, sizeof(*nr) * (size_t)(c->nroutes + 1));
    if (!nr) {
        gw_errf(err, errlen, "out of memory");
        return -1;
    }
    c->routes = nr;
    gw_route *r = &nr[c->nroutes];
    memset(r, 0, sizeof(*r));
    r->listener_id = s->listener_id;
    r->hostname = strdup(s->hostname ? s->hostname : "");
    r->path_exact = s->path_exact;
    r->path = strdup(s->path);
    r->path_len = strlen(s->path);
    /* "/a/" as a prefix matches like "/a" (Gateway API ignores a trailing slash) */
    while (!r->path_exact && r->path_len > 1 && r->path[r->path_len - 1] == '/')
        r->path[--r->path_len] = 0;
    r->backend = s->backend;
    r->waf = waf_retain(s->waf);
    r->waf_mode = s->waf ? s->waf_mode : GW_WAF_OFF;
    r->max_body = s->max_body;
    r->stat_slot = s->stat_slot;
    r->name = strdup(s->name ? s->name : "");
    r->method = strdup(s->method ? s->method : "");
    c->nroutes++;
    if (parse_headers(r, s->headers ? s->headers : "") < 0) {
        gw_errf(err, errlen, "bad header match list");
        return -1; /* the route stays, freed with the config, which the caller must discard */
    }
    return c->nroutes - 1;
}

static int host_match(const char *pattern, const char *host, size_t len)
{
    if (!pattern[0])
        return 1;
    if (pattern[0] == '*') { /* "*.example.com": at least one more label before the suffix */
        size_t sl = strlen(pattern + 1);
        return len > sl && strncasecmp(host + len - sl, pattern + 1, sl) == 0;
    }
    return strlen(pattern) == len && strncasecmp(pattern, host, len) == 0;
}

/* PathPrefix matches whole path elements: "/foo" matches "/foo", "/foo/" and "/foo/bar", not "/foobar". */
static int path_match(const gw_route *r, const char *path, size_t len)
{
    if (r->path_exact)
        return len == r->path_len && memcmp(path, r->path, len) == 0;
    if (r->path_len == 1)
        return 1;
    if (len < r->path_len || memcmp(path, r->path, r->path_len) != 0)
        return 0;
    return len == r->path_len || path[r->path_len] == '/';
}

const gw_route *config_match(const gw_config *c, int listener_id, const char *method, const char *host,
                             size_t host_len, const char *path, size_t path_len, gw_header_lookup header,
                             void *ctx)
{
    for (int i = 0; i < c->nroutes; i++) {
        const gw_route *r = &c->routes[i];
        if (r->listener_id != listener_id || !host_match(r->hostname, host, host_len) ||
            !path_match(r, path, path_len) || (r->method[0] && strcmp(r->method, method) != 0))
            continue;
        int ok = 1;
        for (int h = 0; ok && h < r->nheaders; h++) {
            size_t vl;
            const char *v = header(ctx, r->headers[h].name, &vl);
            ok = v && vl == strlen(r->headers[h].value) && memcmp(v, r->headers[h].value, vl) == 0;
        }
        if (ok)
            return r;
    }
    return NULL;
}
