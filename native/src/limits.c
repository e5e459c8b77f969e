/* Per-source and per-peer accounting shared by all loops: what one client may hold, so that it can only
 * ever exhaust its own share (pending handshakes and connections per source address, streams per
 * authenticated peer identity, pending handshakes engine-wide). The proxy sets the numbers
 * (ambit_engine_set_limits); every refusal is counted. One mutex: taken once per connection or stream
 * start/end, never per byte. */
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "internal.h"

typedef struct share {
    uint32_t pending; /* server handshakes in progress */
    uint32_t conns;   /* source: server connections (pending or established); peer: its connections */
    uint32_t streams; /* served streams of this peer identity */
    uint32_t resets;  /* stream resets this peer identity caused in the current window */
    uint64_t reset_window_ms;
} share;

static uint64_t fnv1a(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

/* The agent's own same-node HBONE runs over a socket pair (docs/proxy.md): no address to key by, and
 * already bounded per source pod by the proxy before it exists; exempt from the per-source caps. */
#define LOCAL_SOURCE 2

uint64_t limits_source_key(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
        return 1; /* unknown: one shared bucket */
    if (ss.ss_family == AF_UNIX)
        return LOCAL_SOURCE;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)&ss;
        return (1ULL << 40) | ntohl(in->sin_addr.s_addr); /* exact */
    }
    if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&ss;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            uint32_t v4;
            memcpy(&v4, in6->sin6_addr.s6_addr + 12, 4);
            return (1ULL << 40) | ntohl(v4);
        }
        return fnv1a(&in6->sin6_addr, 16) | (1ULL << 63); /* a collision only shares a budget */
    }
    return 1;
}

uint64_t limits_peer_key(const char *peer_id) { return fnv1a(peer_id, strlen(peer_id)) | (1ULL << 62); }

static share *share_get(ambit_engine *e, uint64_t key, int create)
{
    share *s = amap_get(&e->shares, key);
    if (!s && create && (s = calloc(1, sizeof(*s))) && amap_put(&e->shares, key, s) < 0) {
        free(s);
        s = NULL;
    }
    return s;
}

static void share_drop_if_idle(ambit_engine *e, uint64_t key, share *s)
{
    if (!s->pending && !s->conns && !s->streams)
        free(amap_del(&e->shares, key));
}

static int limit(ambit_engine *e, int which) { return __atomic_load_n(&e->limits[which], __ATOMIC_RELAXED); }

const char *limits_conn_start(ambit_engine *e, uint64_t src)
{
    const char *why = NULL;
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, src, 1);
    int total = limit(e, AMBIT_L_PENDING_HANDSHAKES), per = limit(e, AMBIT_L_PENDING_PER_SOURCE);
    int conns = limit(e, AMBIT_L_CONNS_PER_SOURCE);
    if (!s)
        why = "out of memory";
    else if (total && e->pending_handshakes >= (uint32_t)total)
        why = "too many pending handshakes";
    else if (per && src != LOCAL_SOURCE && s->pending >= (uint32_t)per)
        why = "too many pending handshakes from this source";
    else if (conns && src != LOCAL_SOURCE && s->conns >= (uint32_t)conns)
        why = "too many connections from this source";
    if (!why) {
        s->pending++;
        s->conns++;
        e->pending_handshakes++;
    } else if (s) {
        share_drop_if_idle(e, src, s);
    }
    pthread_mutex_unlock(&e->limits_lock);
    return why;
}

void limits_handshake_over(ambit_engine *e, uint64_t src)
{
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, src, 0);
    if (s && s->pending) {
        s->pending--;
        e->pending_handshakes--;
    }
    pthread_mutex_unlock(&e->limits_lock);
}

void limits_conn_end(ambit_engine *e, uint64_t src, int pending)
{
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, src, 0);
    if (s) {
        if (pending && s->pending) {
            s->pending--;
            e->pending_handshakes--;
        }
        if (s->conns)
            s->conns--;
        share_drop_if_idle(e, src, s);
    }
    pthread_mutex_unlock(&e->limits_lock);
}

int limits_stream_start(ambit_engine *e, uint64_t peer)
{
    int ok = 1, per = limit(e, AMBIT_L_STREAMS_PER_PEER);
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, peer, 1);
    if (!s || (per && s->streams >= (uint32_t)per))
        ok = 0;
    else
        s->streams++;
    if (s && !ok)
        share_drop_if_idle(e, peer, s);
    pthread_mutex_unlock(&e->limits_lock);
    return ok;
}

void limits_stream_end(ambit_engine *e, uint64_t peer)
{
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, peer, 0);
    if (s && s->streams) {
        s->streams--;
        share_drop_if_idle(e, peer, s);
    }
    pthread_mutex_unlock(&e->limits_lock);
}

static void share_free(void *value, void *arg)
{
    (void)arg;
    free(value);
}

void limits_peer_conn(ambit_engine *e, uint64_t peer, int delta)
{
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, peer, delta > 0);
    if (s) {
        if (delta > 0)
            s->conns++;
        else if (s->conns)
            s->conns--;
        share_drop_if_idle(e, peer, s);
    }
    pthread_mutex_unlock(&e->limits_lock);
}

int limits_reset(ambit_engine *e, uint64_t peer, uint64_t now)
{
    uint32_t budget = (uint32_t)limit(e, AMBIT_L_RESETS_PER_S);
    int over = 0;
    if (!budget)
        return 0;
    pthread_mutex_lock(&e->limits_lock);
    share *s = share_get(e, peer, 1);
    if (s) {
        if (now - s->reset_window_ms >= 1000) {
            s->reset_window_ms = now;
            s->resets = 0;
        }
        over = ++s->resets > budget;
        share_drop_if_idle(e, peer, s);
    }
    pthread_mutex_unlock(&e->limits_lock);
    return over;
}

void limits_free(ambit_engine *e)
{
    amap_each(&e->shares, share_free, NULL);
    amap_free(&e->shares);
}
