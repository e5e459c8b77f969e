/* The gateway object: N loop threads, one edge-triggered epoll each, sharing the listening sockets
 * (EPOLLEXCLUSIVE, so one loop wakes per new connection); the config pointer swapped under a mutex; the
 * bounded event queue to Python (eventfd readable while events are pending); counters. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

static const char *counter_names[GW_C_COUNT] = {
    "conns_accepted", "conns_active", "conns_refused", "tls_handshakes", "tls_errors",
    "requests", "responses", "bad_requests", "headers_too_large", "body_too_large",
    "timeouts", "no_route", "upstream_connects", "upstream_reused", "upstream_errors",
    "upstream_timeouts", "waf_blocked", "waf_detected", "waf_errors", "events_dropped",
    "bytes_in", "bytes_out",
};

const char *gw_counter_name(int index)
{
    return index >= 0 && index < GW_C_COUNT ? counter_names[index] : NULL;
}

gw *gw_new(int threads, const gw_limits *limits, char *err, size_t errlen)
{
    if (threads < 1 || threads > 64) {
        gw_errf(err, errlen, "threads must be 1..64");
        return NULL;
    }
    gw *g = calloc(1, sizeof(*g));
    size_t ev_cap = limits->event_queue > 0 ? (size_t)limits->event_queue : 4096;
    gw_event *events = calloc(ev_cap, sizeof(gw_event));
    gw_loop *loops = calloc((size_t)threads, sizeof(gw_loop));
    int evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!g || !events || !loops || evfd < 0) {
        gw_errf(err, errlen, "out of memory or eventfd: %s", strerror(errno));
        free(g);
        free(events);
        free(loops);
        if (evfd >= 0)
            close(evfd);
        return NULL;
    }
    g->limits = *limits;
    g->events = events;
    g->ev_cap = ev_cap;
    g->loops = loops;
    g->nloops = threads;
    g->evfd = evfd;
    pthread_mutex_init(&g->cfg_lock, NULL);
    pthread_mutex_init(&g->ev_lock, NULL);
    for (int i = 0; i < threads; i++) {
        loops[i].g = g;
        loops[i].index = i;
        loops[i].epfd = loops[i].wakefd = -1;
        pthread_mutex_init(&loops[i].ready_lock, NULL);
        if (getrandom(&loops[i].rng, sizeof(loops[i].rng), 0) != sizeof(loops[i].rng))
            loops[i].rng = gw_now_ms() ^ ((uint64_t)i << 32);
        loops[i].rng |= 1;
    }
    return g;
}

int gw_listen(gw *g, int fd, int listener_id, char *err, size_t errlen)
{
    if (g->started || g->nlisteners == 64) {
        gw_errf(err, errlen, g->started ? "listeners are added before start" : "too many listeners");
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    g->listen_fds[g->nlisteners] = fd;
    g->listener_ids[g->nlisteners] = listener_id;
    g->nlisteners++;
    return 0;
}

gw_config *gw_current_config(gw *g)
{
    pthread_mutex_lock(&g->cfg_lock);
    gw_config *c = config_retain(g->cfg);
    pthread_mutex_unlock(&g->cfg_lock);
    return c;
}

void gw_apply(gw *g, gw_config *c)
{
    config_retain(c);
    pthread_mutex_lock(&g->cfg_lock);
    gw_config *old = g->cfg;
    g->cfg = c;
    pthread_mutex_unlock(&g->cfg_lock);
    gw_config_release(old);
}

void gw_emit(gw *g, const gw_event *ev)
{
    pthread_mutex_lock(&g->ev_lock);
    int dropped = g->ev_count == g->ev_cap;
    if (!dropped) {
        g->events[(g->ev_head + g->ev_count) % g->ev_cap] = *ev;
        g->ev_count++;
    }
    pthread_mutex_unlock(&g->ev_lock);
    if (dropped) {
        gw_count(g, GW_C_EVENTS_DROPPED, 1);
        return;
    }
    uint64_t one = 1;
    if (write(g->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        gw_count(g, GW_C_EVENTS_DROPPED, 0);
}

int gw_events(gw *g, gw_event *out, int max)
{
    uint64_t drain;
    if (read(g->evfd, &drain, sizeof(drain)) < 0 && errno != EAGAIN)
        return -1;
    pthread_mutex_lock(&g->ev_lock);
    int n = 0;
    while (n < max && g->ev_count) {
        out[n++] = g->events[g->ev_head];
        g->ev_head = (g->ev_head + 1) % g->ev_cap;
        g->ev_count--;
    }
    if (g->ev_count) { /* more left: keep the eventfd readable */
        uint64_t one = 1;
        if (write(g->evfd, &one, sizeof(one)) < 0)
            n = n; /* the counter is already non-zero or the caller drains again */
    }
    pthread_mutex_unlock(&g->ev_lock);
    return n;
}

static void loop_push(gw_loop *l, gw_ready *r)
{
    pthread_mutex_lock(&l->ready_lock);
    r->next = l->ready;
    l->ready = r;
    pthread_mutex_unlock(&l->ready_lock);
    uint64_t one = 1;
    if (write(l->wakefd, &one, sizeof(one)) < 0)
        one = 0; /* the counter is already non-zero: the loop wakes anyway */
}

int gw_upstream_ready(gw *g, uint64_t token, int fd)
{
    size_t index = (size_t)(token & 0xff);
    gw_ready *r = token && index < (size_t)g->nloops ? malloc(sizeof(*r)) : NULL;
    if (!r) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    *r = (gw_ready){.token = token, .fd = fd};
    loop_push(&g->loops[index], r);
    return 0;
}

int gw_eventfd(gw *g)
{
    return g->evfd;
}

void gw_counters(gw *g, uint64_t *out, int n)
{
    for (int i = 0; i < n && i < GW_C_COUNT; i++)
        out[i] = atomic_load(&g->counters[i]);
}

void gw_route_stats(gw *g, int slot, uint64_t *out)
{
    for (int a = 0; a < GW_ACTION_COUNT; a++)
        out[a] = slot >= 0 && slot < GW_MAX_ROUTE_SLOTS ? atomic_load(&g->route_stats[slot][a]) : 0;
}

static void adopt(gw_loop *l, int fd, int listener_id)
{
    struct sockaddr_storage peer;
    socklen_t plen = sizeof(peer);
    if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0) {
        close(fd);
        return;
    }
    http1_accept(l, fd, listener_id, &peer);
}

/* Connections are dealt round robin over the loops: the loop that wakes first would otherwise take a whole
 * burst of clients (EPOLLEXCLUSIVE wakes one loop, and it drains the backlog), leaving the others idle. */
static void accept_ready(gw_loop *l, gw_listener_ep *le)
{
    for (int budget = 64; budget > 0; budget--) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof(peer);
        int fd = accept4(le->fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or an aborted connection: the next event retries */
        gw_count(l->g, GW_C_CONNS_ACCEPTED, 1);
        if (atomic_load(&l->g->conns) >= l->g->limits.max_connections) {
            gw_count(l->g, GW_C_CONNS_REFUSED, 1);
            close(fd);
            continue;
        }
        gw_loop *target = &l->g->loops[atomic_fetch_add(&l->g->next_loop, 1) % (unsigned)l->g->nloops];
        gw_ready *r = target != l ? malloc(sizeof(*r)) : NULL;
        if (r) {
            *r = (gw_ready){.token = 0, .fd = fd, .listener_id = le->listener_id};
            loop_push(target, r);
        } else {
            http1_accept(l, fd, le->listener_id, &peer);
        }
    }
}

static void *loop_main(void *arg)
{
    gw_loop *l = arg;
    struct epoll_event evs[128];
    uint64_t next_tick = gw_now_ms() + 250;
    while (!atomic_load(&l->g->stopping)) {
        int n = epoll_wait(l->epfd, evs, 128, 250);
        for (int i = 0; i < n; i++) {
            ep_item *it = evs[i].data.ptr;
            switch (it->kind) {
            case EP_LISTENER:
                accept_ready(l, (gw_listener_ep *)it);
                break;
            case EP_CLIENT:
                http1_client_event((gw_conn *)it, evs[i].events);
                break;
            case EP_UPSTREAM:
                http1_upstream_event((gw_upstream *)it, evs[i].events);
                break;
            default: {
                uint64_t v;
                if (read(l->wakefd, &v, sizeof(v)) < 0)
                    v = 0;
                pthread_mutex_lock(&l->ready_lock);
                gw_ready *r = l->ready;
                l->ready = NULL;
                pthread_mutex_unlock(&l->ready_lock);
                while (r) {
                    gw_ready *next = r->next;
                    if (r->token)
                        http1_upstream_ready(l, r->token, r->fd);
                    else
                        adopt(l, r->fd, r->listener_id);
                    free(r);
                    r = next;
                }
            }
            }
        }
        uint64_t now = gw_now_ms();
        if (now >= next_tick) { /* deadlines are checked 4 times a second */
            http1_tick(l, now);
            next_tick = now + 250;
        }
        http1_reap();
    }
    http1_close_all(l);
    return NULL;
}

int gw_start(gw *g, char *err, size_t errlen)
{
    if (g->started) {
        gw_errf(err, errlen, "already started");
        return -1;
    }
    for (int i = 0; i < g->nloops; i++) {
        gw_loop *l = &g->loops[i];
        l->epfd = epoll_create1(EPOLL_CLOEXEC);
        l->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        l->listeners = calloc((size_t)g->nlisteners, sizeof(gw_listener_ep));
        if (l->epfd < 0 || l->wakefd < 0 || (g->nlisteners && !l->listeners)) {
            gw_errf(err, errlen, "epoll/eventfd: %s", strerror(errno));
            return -1;
        }
        l->wake_ep.kind = EP_WAKE;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &l->wake_ep};
        epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wakefd, &ev);
        for (int j = 0; j < g->nlisteners; j++) {
            gw_listener_ep *le = &l->listeners[j];
            le->ep.kind = EP_LISTENER;
            le->fd = g->listen_fds[j];
            le->listener_id = g->listener_ids[j];
            struct epoll_event lev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = le};
            if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, le->fd, &lev) < 0) {
                gw_errf(err, errlen, "epoll_ctl listener: %s", strerror(errno));
                return -1;
            }
        }
    }
    for (int i = 0; i < g->nloops; i++)
        if (pthread_create(&g->loops[i].thread, NULL, loop_main, &g->loops[i]) != 0) {
            gw_errf(err, errlen, "pthread_create failed");
            atomic_store(&g->stopping, 1);
            for (int j = 0; j < i; j++)
                pthread_join(g->loops[j].thread, NULL);
            return -1;
        }
    g->started = 1;
    return 0;
}

void gw_stop(gw *g)
{
    if (!g)
        return;
    atomic_store(&g->stopping, 1);
    for (int i = 0; i < g->nloops; i++) {
        gw_loop *l = &g->loops[i];
        if (g->started) {
            uint64_t one = 1;
            if (write(l->wakefd, &one, sizeof(one)) < 0)
                one = 0;
            pthread_join(l->thread, NULL);
        }
        if (l->epfd >= 0)
            close(l->epfd);
        if (l->wakefd >= 0)
            close(l->wakefd);
        for (gw_ready *r = l->ready, *next; r; r = next) { /* handed in after the loop stopped */
            next = r->next;
            if (r->fd >= 0)
                close(r->fd);
            free(r);
        }
        pthread_mutex_destroy(&l->ready_lock);
        free(l->listeners);
    }
    for (int j = 0; j < g->nlisteners; j++)
        close(g->listen_fds[j]);
    gw_config_release(g->cfg);
    close(g->evfd);
    free(g->events);
    free(g->loops);
    pthread_mutex_destroy(&g->cfg_lock);
    pthread_mutex_destroy(&g->ev_lock);
    free(g);
}
