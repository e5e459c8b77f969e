/* The inbound fast path (15008): a served CONNECT whose inputs match an entry Python installed is accepted
 * by the engine itself, as accept_connect does (connect to the pod from the client's address, 200 once
 * connected, 503 when not), without waiting for Python's decision.
 *
 * An entry is keyed by exactly what Python's decision read: the HBONE connection (hence its verified peer
 * identity and the address it was dialled to), the raw :authority, and the claimed source of `forwarded`
 * (parsed here more strictly than Python parses it, so a claim this file accepts is one Python reads the
 * same way; any other header is a miss). Python installs one only after allowing an identical stream
 * itself, in the generation it read before that decision (ambit_fastin_invalidate bumps it on every
 * snapshot, policy or identity change: older entries are misses), with `credits` streams before it looks
 * again. Everything else is an ordinary stream_request: a miss never accepts and never refuses.
 *
 * Python still sees every stream: one AMBIT_EV_FAST_ACCEPT once the connect to the pod ended (upstream.c;
 * it stands for stream_accepted, or precedes upstream_failed), then its stream_closed. The table holds at
 * most `capacity` entries. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define CLAIM_MAX 16 /* "255.255.255.255" and its NUL */
#define ADDR_MAX 46  /* INET6_ADDRSTRLEN */

typedef struct ientry {
    uint64_t id;
    uint64_t conn_id;
    char authority[AMBIT_HEADER_MAX];
    char claim[CLAIM_MAX];      /* the claimed source IP, "" for a stream without `forwarded` */
    char dst_ip[ADDR_MAX], src_ip[ADDR_MAX]; /* src_ip "": the pod sees the agent's address */
    int dst_port, mark, credits;
    uint64_t generation;
    struct ientry *chain;
} ientry;

struct fastin {
    pthread_mutex_t lock;      /* the table and the entries' credits */
    ientry **slots;
    size_t nslots, count;
    size_t capacity;           /* atomic */
    amap by_id;
    uint64_t generation;       /* atomic: bumped by ambit_fastin_invalidate */
    uint64_t next_tag;
    uint64_t counters[AMBIT_FASTIN_C_COUNT];
};

static const char *const COUNTER_NAMES[AMBIT_FASTIN_C_COUNT] = {
    "fastpath_in_hits", "fastpath_in_misses", "fastpath_in_misses_no_entry", "fastpath_in_misses_stale",
    "fastpath_in_misses_no_credit", "fastpath_in_misses_claim", "fastpath_in_refused",
    "fastpath_in_handoffs_dropped", "fastpath_in_entries",
};

const char *ambit_fastin_counter_name(int index)
{
    return index >= 0 && index < AMBIT_FASTIN_C_COUNT ? COUNTER_NAMES[index] : "";
}

static void ictr(struct fastin *f, int c, int64_t v) { __atomic_add_fetch(&f->counters[c], (uint64_t)v, __ATOMIC_RELAXED); }

static void fastin_init(void *table) { ((struct fastin *)table)->capacity = AMBIT_FASTIN_DEFAULT_CAPACITY; }

static struct fastin *fastin_of(ambit_engine *e)
{
    return fast_table_of((void **)&e->fast_in, sizeof(struct fastin), fastin_init);
}

static uint64_t key_hash(uint64_t conn_id, const char *authority, const char *claim)
{
    uint64_t h = 1469598103934665603ULL ^ conn_id; /* FNV-1a over the strings, seeded by the connection */
    for (const char *p = authority; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ULL;
    h = (h ^ 0xff) * 1099511628211ULL; /* separator: no byte of a header value */
    for (const char *p = claim; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ULL;
    return h;
}

static ientry **slot_of(struct fastin *f, uint64_t conn_id, const char *authority, const char *claim)
{
    return &f->slots[key_hash(conn_id, authority, claim) & (f->nslots - 1)];
}

static ientry *find(struct fastin *f, uint64_t conn_id, const char *authority, const char *claim)
{
    if (!f->nslots)
        return NULL;
    for (ientry *x = *slot_of(f, conn_id, authority, claim); x; x = x->chain)
        if (x->conn_id == conn_id && !strcmp(x->authority, authority) && !strcmp(x->claim, claim))
            return x;
    return NULL;
}

/* A dotted-quad IPv4 address in its one canonical spelling (inet_ntop gives it back unchanged) that Python
 * also accepts as a pod's: not 0/8, loopback, multicast or reserved. */
static int canonical_ipv4(const char *text, size_t len, char *out)
{
    char buf[CLAIM_MAX], back[CLAIM_MAX];
    struct in_addr a;
    if (!len || len >= sizeof(buf))
        return -1;
    memcpy(buf, text, len);
    buf[len] = 0;
    if (inet_pton(AF_INET, buf, &a) != 1 || !inet_ntop(AF_INET, &a, back, sizeof(back)) || strcmp(buf, back))
        return -1;
    uint8_t first = ((const uint8_t *)&a.s_addr)[0];
    if (first == 0 || first == 127 || first >= 224)
        return -1;
    memcpy(out, buf, len + 1);
    return 0;
}

/* The claim of a `forwarded` value, in a strict subset of what agent/proxy/forwarded.py accepts:
 * `for=<ipv4>`, `for="<ipv4>"` or `for="<ipv4>:<port>"` (port 1-65535, no leading zero), nothing else (no
 * host=, no IPv6, no other spelling). 0 with the IP in `ip` and the port (0: none), -1 for anything else:
 * Python decides those. */
static int parse_claim(const char *v, char *ip, int *port)
{
    *port = 0;
    if (strncmp(v, "for=", 4))
        return -1;
    v += 4;
    size_t len = strlen(v);
    if (len < 2 || v[0] != '"') /* unquoted: a token, the bare address (a port needs quotes) */
        return canonical_ipv4(v, len, ip);
    if (v[len - 1] != '"')
        return -1;
    v++;
    len -= 2;
    const char *colon = memchr(v, ':', len);
    if (!colon)
        return canonical_ipv4(v, len, ip);
    const char *p = colon + 1, *end = v + len;
    if (p == end || end - p > 5 || *p == '0')
        return -1;
    int n = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        n = n * 10 + (*p - '0');
    }
    if (n > 65535 || canonical_ipv4(v, (size_t)(colon - v), ip) < 0)
        return -1;
    *port = n;
    return 0;
}

/* Capacity and generation are single words, read and written atomically: an invalidation takes no lock
 * (it may come from any thread), and a put or lookup racing it sees either value, which is safe either way:
 * an entry put in the old generation is a miss from the bump on. */
int ambit_fastin_set_capacity(ambit_engine *e, int capacity)
{
    struct fastin *f = fastin_of(e);
    if (!f || capacity < 0)
        return -1;
    __atomic_store_n(&f->capacity, (size_t)capacity, __ATOMIC_RELAXED);
    return 0;
}

uint64_t ambit_fastin_invalidate(ambit_engine *e)
{
    struct fastin *f = fastin_of(e);
    return f ? __atomic_add_fetch(&f->generation, 1, __ATOMIC_SEQ_CST) : 0;
}

uint64_t ambit_fastin_generation(ambit_engine *e)
{
    struct fastin *f = fastin_of(e);
    return f ? __atomic_load_n(&f->generation, __ATOMIC_SEQ_CST) : 0;
}

static int fits(const char *s, size_t cap) { return s && strlen(s) < cap; }

int ambit_fastin_put(ambit_engine *e, uint64_t entry_id, uint64_t generation, uint64_t conn_id,
                     const char *authority, const char *claim_ip, const char *dst_ip, int dst_port,
                     const char *source_ip, int mark, int credits, char *err, size_t errlen)
{
    struct fastin *f = fastin_of(e);
    char probe[CLAIM_MAX];
    const char *why = NULL;
    if (!f)
        why = "out of memory";
    else if (!fits(authority, AMBIT_HEADER_MAX) || !*authority)
        why = "bad authority";
    else if (!fits(claim_ip, CLAIM_MAX) || (*claim_ip && canonical_ipv4(claim_ip, strlen(claim_ip), probe) < 0))
        why = "bad claimed source";
    else if (!fits(dst_ip, ADDR_MAX) || (source_ip && !fits(source_ip, ADDR_MAX)) || dst_port <= 0 ||
             dst_port > 65535)
        why = "bad upstream address";
    else if (credits < 1)
        why = "bad credits";
    if (why) {
        copy_str(err, errlen, why);
        return -1;
    }
    ientry *x = calloc(1, sizeof(*x));
    if (!x) {
        copy_str(err, errlen, "out of memory");
        return -1;
    }
    x->id = entry_id;
    x->conn_id = conn_id;
    copy_str(x->authority, sizeof(x->authority), authority);
    copy_str(x->claim, sizeof(x->claim), claim_ip);
    copy_str(x->dst_ip, sizeof(x->dst_ip), dst_ip);
    copy_str(x->src_ip, sizeof(x->src_ip), source_ip ? source_ip : "");
    x->dst_port = dst_port;
    x->mark = mark;
    x->credits = credits;
    x->generation = generation;
    pthread_mutex_lock(&f->lock);
    int ready = fast_slots_ready((void **)&f->slots, &f->nslots);
    why = fast_put_refused(ready, generation != __atomic_load_n(&f->generation, __ATOMIC_SEQ_CST),
                           f->count >= __atomic_load_n(&f->capacity, __ATOMIC_RELAXED),
                           ready && (find(f, conn_id, authority, claim_ip) || amap_get(&f->by_id, entry_id)));
    if (why || amap_put(&f->by_id, entry_id, x) < 0) {
        why = why ? why : "out of memory";
        pthread_mutex_unlock(&f->lock);
        free(x);
        ictr(f, AMBIT_FASTIN_C_REFUSED, 1);
        copy_str(err, errlen, why);
        return -1;
    }
    ientry **slot = slot_of(f, conn_id, authority, claim_ip);
    x->chain = *slot;
    *slot = x;
    f->count++;
    ictr(f, AMBIT_FASTIN_C_ENTRIES, 1);
    pthread_mutex_unlock(&f->lock);
    return 0;
}

/* `n` more credits for an installed entry (Python's top-up, or one given back): 0, -1 when not installed. */
static int credit(struct fastin *f, uint64_t entry_id, int n)
{
    pthread_mutex_lock(&f->lock);
    ientry *x = amap_get(&f->by_id, entry_id);
    int found = x != NULL;
    if (found)
        x->credits += n;
    pthread_mutex_unlock(&f->lock);
    return found ? 0 : -1;
}

int ambit_fastin_add_credits(ambit_engine *e, uint64_t entry_id, int credits)
{
    struct fastin *f = fastin_of(e);
    return f && credits > 0 ? credit(f, entry_id, credits) : -1;
}

int ambit_fastin_remove(ambit_engine *e, uint64_t entry_id)
{
    struct fastin *f = fastin_of(e);
    if (!f)
        return -1;
    pthread_mutex_lock(&f->lock);
    ientry *x = amap_del(&f->by_id, entry_id);
    ientry **pp = x ? slot_of(f, x->conn_id, x->authority, x->claim) : NULL;
    while (pp && *pp && *pp != x)
        pp = &(*pp)->chain;
    if (pp && *pp) { /* an entry in by_id is always in its slot's chain */
        *pp = x->chain;
        f->count--;
        ictr(f, AMBIT_FASTIN_C_ENTRIES, -1);
    }
    pthread_mutex_unlock(&f->lock);
    int left = x ? x->credits : -1;
    free(x);
    return left;
}

void ambit_fastin_counters(ambit_engine *e, uint64_t *out, int n)
{
    struct fastin *f = __atomic_load_n(&e->fast_in, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n && i < AMBIT_FASTIN_C_COUNT; i++)
        out[i] = f ? __atomic_load_n(&f->counters[i], __ATOMIC_RELAXED) : 0;
}

static void miss(struct fastin *f, int why)
{
    ictr(f, AMBIT_FASTIN_C_MISSES, 1);
    ictr(f, why, 1);
}

int fastin_try(ambit_loop *l, uint64_t conn_id, uint64_t stream_id, const char *authority, const char *forwarded,
               int forwarded_bad, const char *traceparent)
{
    ambit_engine *e = l->engine;
    struct fastin *f = __atomic_load_n(&e->fast_in, __ATOMIC_ACQUIRE);
    if (!f || !authority) /* never enabled: every stream is Python's, uncounted */
        return 0;
    char claim[CLAIM_MAX] = "";
    int port = 0;
    if (forwarded_bad || (forwarded && parse_claim(forwarded, claim, &port) < 0)) {
        miss(f, AMBIT_FASTIN_C_MISSES_CLAIM);
        return 0;
    }
    acmd c = {.kind = CMD_ACCEPT_CONNECT, .id = conn_id, .id2 = stream_id, .fd = -1, .fd2 = -1};
    char dst_ip[ADDR_MAX], src_ip[ADDR_MAX];
    uint64_t entry_id = 0;
    int why = 0;
    pthread_mutex_lock(&f->lock);
    ientry *x = f->count ? find(f, conn_id, authority, claim) : NULL;
    if (!x)
        why = AMBIT_FASTIN_C_MISSES_NO_ENTRY;
    else if (x->generation != __atomic_load_n(&f->generation, __ATOMIC_SEQ_CST))
        why = AMBIT_FASTIN_C_MISSES_STALE;
    else if (x->credits <= 0)
        why = AMBIT_FASTIN_C_MISSES_NO_CREDIT;
    else {
        x->credits--;
        entry_id = x->id;
        memcpy(dst_ip, x->dst_ip, sizeof(dst_ip));
        memcpy(src_ip, x->src_ip, sizeof(src_ip));
        c.status = x->dst_port;
        c.aux = (uint64_t)(unsigned)x->mark;
        c.tag = AMBIT_FASTIN_TAG_BIT | ++f->next_tag;
    }
    pthread_mutex_unlock(&f->lock);
    if (why) {
        miss(f, why);
        return 0;
    }
    ictr(f, AMBIT_FASTIN_C_HITS, 1);
    fast_accept fa = {.entry = entry_id, .port = port};
    copy_str(fa.traceparent, sizeof(fa.traceparent), traceparent);
    c.text = dst_ip;
    c.text2 = src_ip[0] ? src_ip : NULL;
    accept_connect_fast(l, &c, &fa); /* on this loop, as ambit_accept_connect's command runs */
    return 1;
}

void fastin_unseen(ambit_engine *e, uint64_t entry_id)
{
    credit(e->fast_in, entry_id, 1); /* removed meanwhile: nothing to give back to */
    ictr(e->fast_in, AMBIT_FASTIN_C_HANDOFFS_DROPPED, 1);
}

void fastin_free(ambit_engine *e)
{
    struct fastin *f = e->fast_in;
    if (!f)
        return;
    for (size_t i = 0; i < f->nslots; i++)
        for (ientry *x = f->slots[i], *next; x; x = next) {
            next = x->chain;
            free(x);
        }
    free(f->slots);
    amap_free(&f->by_id);
    pthread_mutex_destroy(&f->lock);
    free(f);
    e->fast_in = NULL;
}
