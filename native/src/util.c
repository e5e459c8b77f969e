/* Small containers and fd helpers used by every part of the engine. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "internal.h"

int abuf_reserve(abuf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    if (b->off > 0) { /* reclaim the consumed prefix before growing */
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= extra)
            return 0;
    }
    size_t cap = b->cap ? b->cap : 16384;
    while (cap - b->len < extra)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

int abuf_append(abuf *b, const void *p, size_t n)
{
    if (abuf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

void abuf_consume(abuf *b, size_t n)
{
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}

void abuf_free(abuf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

static size_t amap_slot(const amap *m, uint64_t key)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (size_t)(key & (m->nslots - 1));
}

static int amap_grow(amap *m)
{
    size_t n = m->nslots ? m->nslots * 2 : 64;
    amap_entry **slots = calloc(n, sizeof(*slots));
    if (!slots)
        return -1;
    amap old = *m;
    m->slots = slots;
    m->nslots = n;
    for (size_t i = 0; i < old.nslots; i++) {
        for (amap_entry *en = old.slots[i], *next; en; en = next) {
            next = en->next;
            size_t s = amap_slot(m, en->key);
            en->next = m->slots[s];
            m->slots[s] = en;
        }
    }
    free(old.slots);
    return 0;
}

int amap_put(amap *m, uint64_t key, void *value)
{
    if (m->count >= m->nslots && amap_grow(m) < 0)
        return -1;
    amap_entry *en = malloc(sizeof(*en));
    if (!en)
        return -1;
    size_t s = amap_slot(m, key);
    en->key = key;
    en->value = value;
    en->next = m->slots[s];
    m->slots[s] = en;
    m->count++;
    return 0;
}

void *amap_get(const amap *m, uint64_t key)
{
    if (!m->nslots)
        return NULL;
    for (amap_entry *en = m->slots[amap_slot(m, key)]; en; en = en->next)
        if (en->key == key)
            return en->value;
    return NULL;
}

void *amap_del(amap *m, uint64_t key)
{
    if (!m->nslots)
        return NULL;
    for (amap_entry **pp = &m->slots[amap_slot(m, key)]; *pp; pp = &(*pp)->next) {
        if ((*pp)->key == key) {
            amap_entry *en = *pp;
            void *v = en->value;
            *pp = en->next;
            free(en);
            m->count--;
            return v;
        }
    }
    return NULL;
}

void *amap_any(const amap *m)
{
    for (size_t i = 0; i < m->nslots; i++)
        if (m->slots[i])
            return m->slots[i]->value;
    return NULL;
}

/* fn must not add or remove entries of m. */
void amap_each(const amap *m, void (*fn)(void *value, void *arg), void *arg)
{
    for (size_t i = 0; i < m->nslots; i++)
        for (amap_entry *en = m->slots[i]; en; en = en->next)
            fn(en->value, arg);
}

void amap_free(amap *m)
{
    for (size_t i = 0; i < m->nslots; i++)
        for (amap_entry *en = m->slots[i], *next; en; en = next) {
            next = en->next;
            free(en);
        }
    free(m->slots);
    memset(m, 0, sizeof(*m));
}

void copy_str(char *dst, size_t cap, const char *src)
{
    if (!cap)
        return;
    size_t n = src ? strlen(src) : 0;
    if (n >= cap)
        n = cap - 1;
    if (n)
        memcpy(dst, src, n);
    dst[n] = 0;
}

int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* The engine batches its own writes, so Nagle would only add latency to small request/response
 * exchanges. Fails harmlessly on non-TCP sockets. */
void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* SO_LINGER 0 makes close() send a TCP RST: how a reset stream is mapped back onto TCP. */
void reset_close(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(fd);
}

/* Random bytes for trace ids, taken from a per-thread pool that RAND_bytes refills: OpenSSL checks for a
 * fork (getpid) at every call, a syscall per new connection for 24 bytes. 0, or -1 without randomness. */
#define RAND_POOL 1536
static __thread unsigned char rand_pool[RAND_POOL];
static __thread size_t rand_left;

int rand_take(unsigned char *out, size_t n)
{
    if (n > RAND_POOL)
        return RAND_bytes(out, (int)n) == 1 ? 0 : -1;
    if (rand_left < n) {
        if (RAND_bytes(rand_pool, RAND_POOL) != 1)
            return -1;
        rand_left = RAND_POOL;
    }
    memcpy(out, rand_pool + RAND_POOL - rand_left, n);
    OPENSSL_cleanse(rand_pool + RAND_POOL - rand_left, n); /* handed out once */
    rand_left -= n;
    return 0;
}
