/* Live byte counts and state of streams and splices, for the admin view of open connections.
 *
 * Streams and splices belong to one loop thread each and are never touched by another, so a query is a
 * command: the caller posts one to every loop owning one of its items, each loop fills its items in place
 * (disjoint slots) and counts down; the caller waits on a condition variable. The query is refcounted,
 * so a caller that times out, or an engine stopped with the command still queued, frees nothing the
 * other side still uses. Cost: one command per loop per query, a map lookup per item. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

struct ambit_flow_query {
    pthread_mutex_t lock;
    pthread_cond_t answered;
    int pending;  /* loops that have not answered yet */
    int refs;     /* the caller, and each loop command not yet run or dropped */
    int nloops;
    int n;
    ambit_flow_stats items[];
};

static void query_unref(ambit_flow_query *q)
{
    pthread_mutex_lock(&q->lock);
    int last = --q->refs == 0;
    pthread_mutex_unlock(&q->lock);
    if (last) {
        pthread_cond_destroy(&q->answered);
        pthread_mutex_destroy(&q->lock);
        free(q);
    }
}

/* One loop's share is done (answered or dropped): count down, wake the caller. */
static void query_done(ambit_flow_query *q)
{
    pthread_mutex_lock(&q->lock);
    q->pending--;
    pthread_cond_signal(&q->answered);
    pthread_mutex_unlock(&q->lock);
    query_unref(q);
}

void flows_answer(ambit_loop *l, ambit_flow_query *q)
{
    for (int i = 0; i < q->n; i++) {
        ambit_flow_stats *it = &q->items[i];
        if (it->conn_id % (uint64_t)q->nloops != (uint64_t)l->index)
            continue;
        if (!(it->stream_id ? hconn_flow_stats(l, it) : pump_flow_stats(l, it))) {
            it->state = AMBIT_FLOW_UNKNOWN;
            it->bytes_in = it->bytes_out = 0;
        }
    }
    query_done(q);
}

void flows_abandon(ambit_flow_query *q) { query_done(q); }

static ambit_flow_query *query_new(int nloops, const ambit_flow_stats *items, int n)
{
    ambit_flow_query *q = calloc(1, sizeof(*q) + (size_t)n * sizeof(q->items[0]));
    if (!q)
        return NULL;
    pthread_mutex_init(&q->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC); /* a wall-clock step must not stretch the wait */
    pthread_cond_init(&q->answered, &attr);
    pthread_condattr_destroy(&attr);
    q->nloops = nloops;
    q->n = n;
    q->refs = 1;
    for (int i = 0; i < n; i++) {
        q->items[i].conn_id = items[i].conn_id;
        q->items[i].stream_id = items[i].stream_id;
    }
    return q;
}

ambit_flow_query *ambit_flow_query_post(ambit_engine *e, const ambit_flow_stats *items, int n, char *err,
                                        size_t errlen)
{
    const char *why = n < 1 || n > AMBIT_FLOW_QUERY_MAX ? "flow query: 1..4096 items" : e->stopped ? "engine stopped" : NULL;
    ambit_flow_query *q = why ? NULL : query_new(e->nloops, items, n);
    if (!why && !q)
        why = "out of memory";
    if (why) {
        if (err)
            copy_str(err, errlen, why);
        return NULL;
    }
    char *owns = calloc((size_t)e->nloops, 1);
    if (!owns) {
        query_unref(q);
        if (err)
            copy_str(err, errlen, "out of memory");
        return NULL;
    }
    for (int i = 0; i < n; i++)
        owns[items[i].conn_id % (uint64_t)e->nloops] = 1;
    for (int li = 0; li < e->nloops; li++)
        q->pending += owns[li];
    q->refs += q->pending;
    for (int li = 0; li < e->nloops; li++) {
        if (!owns[li])
            continue;
        acmd *c = cmd_new(CMD_FLOW_STATS);
        if (!c) { /* that loop's items stay unknown */
            query_done(q);
            continue;
        }
        c->query = q;
        loop_post(&e->loops[li], c);
    }
    free(owns);
    return q;
}

int ambit_flow_query_wait(ambit_flow_query *q, ambit_flow_stats *out, int n, int timeout_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    int found = -1;
    pthread_mutex_lock(&q->lock);
    while (q->pending > 0)
        if (pthread_cond_timedwait(&q->answered, &q->lock, &deadline) == ETIMEDOUT)
            break;
    if (q->pending == 0) {
        found = 0;
        for (int i = 0; i < n && i < q->n; i++) {
            out[i] = q->items[i];
            found += out[i].state != AMBIT_FLOW_UNKNOWN;
        }
    }
    pthread_mutex_unlock(&q->lock);
    query_unref(q);
    return found;
}
