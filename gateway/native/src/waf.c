/* libmodsecurity behind a few calls: one ModSecurity engine per process, a RulesSet per WAF policy, one
 * Transaction per request. Rule matches reach us through the server log callback (TextLogProperty): we
 * keep each match's id and message, and the anomaly score our own rule 9990001 reports at the end of
 * phase 2 (CRS keeps the score in TX:ANOMALY_SCORE, which the C API cannot read directly). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static ModSecurity *msc;
static pthread_once_t msc_once = PTHREAD_ONCE_INIT;

#define AMBIT_SCORE_RULE "9990001"

/* Copies the value of `[key "..."]` from a ModSecurity log line into out; 0 when absent. */
static size_t log_field(const char *line, const char *key, char *out, size_t outlen)
{
    char pat[32];
    snprintf(pat, sizeof(pat), "[%s \"", key);
    const char *p = strstr(line, pat);
    if (!p || outlen == 0)
        return 0;
    p += strlen(pat);
    const char *end = strstr(p, "\"]");
    if (!end)
        return 0;
    size_t n = (size_t)(end - p);
    if (n >= outlen)
        n = outlen - 1;
    memcpy(out, p, n);
    out[n] = 0;
    for (size_t i = 0; i < n; i++) /* the verdict's lines are tab/newline separated */
        if (out[i] == '\n' || out[i] == '\t' || out[i] == '\r')
            out[i] = ' ';
    return n;
}

static void on_log(void *data, const void *message)
{
    gw_verdict *v = data;
    const char *line = message;
    char id[16], msg[200];
    if (!v || !line || !log_field(line, "id", id, sizeof(id)))
        return;
    log_field(line, "msg", msg, sizeof(msg)) || (msg[0] = 0);
    if (strcmp(id, AMBIT_SCORE_RULE) == 0) { /* "ambit inbound anomaly score PL1 PL2 PL3 PL4" */
        const char *p = strstr(msg, "score");
        int sum = 0;
        for (p = p ? p + 5 : msg + strlen(msg); *p;) {
            char *end;
            long n = strtol(p, &end, 10);
            if (end == p) {
                p++;
                continue;
            }
            sum += (int)n;
            p = end;
        }
        v->score = sum;
        return;
    }
    v->nrules++;
    size_t used = strlen(v->rules), room = sizeof(v->rules) - used;
    int n = snprintf(v->rules + used, room, "%s\t%s\n", id, msg);
    if (n < 0 || (size_t)n >= room)
        v->rules[used] = 0; /* a line that does not fit is left out whole; nrules still counts it */
}

static void msc_setup(void)
{
    msc = msc_init();
    if (!msc)
        return;
    msc_set_connector_info(msc, "ambit-gateway");
    msc_set_log_cb(msc, on_log);
}

static int msc_ready(char *err, size_t errlen)
{
    pthread_once(&msc_once, msc_setup);
    if (!msc) {
        gw_errf(err, errlen, "msc_init failed");
        return -1;
    }
    return 0;
}

const char *gw_waf_version(void)
{
    if (msc_ready(NULL, 0) < 0)
        return "";
    return msc_who_am_i(msc);
}

gw_waf *gw_waf_new(const char *rules, char *err, size_t errlen)
{
    if (msc_ready(err, errlen) < 0)
        return NULL;
    gw_waf *w = calloc(1, sizeof(*w));
    if (!w) {
        gw_errf(err, errlen, "out of memory");
        return NULL;
    }
    w->rules = msc_create_rules_set();
    const char *reason = NULL;
    if (!w->rules || msc_rules_add(w->rules, rules, &reason) < 0) {
        gw_errf(err, errlen, "%s", reason ? reason : "cannot create a rule set");
        free((void *)reason);
        if (w->rules)
            msc_rules_cleanup(w->rules);
        free(w);
        return NULL;
    }
    atomic_init(&w->refs, 1);
    return w;
}

gw_waf *waf_retain(gw_waf *w)
{
    if (w)
        atomic_fetch_add(&w->refs, 1);
    return w;
}

void gw_waf_release(gw_waf *w)
{
    if (w && atomic_fetch_sub(&w->refs, 1) == 1) {
        msc_rules_cleanup(w->rules);
        free(w);
    }
}

Transaction *waf_begin(gw_waf *w, gw_verdict *v, const char *id, const char *cip, int cport, const char *sip,
                       int sport, const char *method, const char *uri, const char *version)
{
    /* our request id as the transaction's unique id: one id in audit records and ModSecurity's logs */
    Transaction *tx = id ? msc_new_transaction_with_id(msc, w->rules, (char *)id, v)
                         : msc_new_transaction(msc, w->rules, v);
    if (!tx) {
        gw_errf(v->detail, sizeof(v->detail), "msc_new_transaction failed");
        return NULL;
    }
    msc_process_connection(tx, cip, cport, sip, sport);
    msc_process_uri(tx, uri, method, version);
    return tx;
}

void waf_header(Transaction *tx, const char *name, size_t nlen, const char *value, size_t vlen)
{
    msc_add_n_request_header(tx, (const unsigned char *)name, nlen, (const unsigned char *)value, vlen);
}

static int intervention(Transaction *tx, gw_verdict *v)
{
    ModSecurityIntervention it = {.status = 200};
    int hit = msc_intervention(tx, &it);
    if (it.log) /* the disruptive rule's message comes only here, not through the log callback */
        on_log(v, it.log);
    free(it.url);
    free(it.log);
    if (!hit || !it.disruptive)
        return 0;
    v->status = it.status >= 400 && it.status <= 599 ? it.status : 403;
    return 1;
}

int waf_headers_done(Transaction *tx, gw_verdict *v)
{
    msc_process_request_headers(tx);
    return intervention(tx, v);
}

void waf_body(Transaction *tx, const char *data, size_t len)
{
    msc_append_request_body(tx, (const unsigned char *)data, len);
}

int waf_body_done(Transaction *tx, gw_verdict *v)
{
    msc_process_request_body(tx);
    return intervention(tx, v);
}

void waf_end(Transaction *tx)
{
    if (!tx)
        return;
    msc_process_logging(tx);
    msc_transaction_cleanup(tx);
}

/* Splits "Name: value\r\n" lines; a line without a colon is a WAF error (the caller built it). */
static int add_header_lines(Transaction *tx, const char *h, size_t len, gw_verdict *v)
{
    const char *end = h + len;
    while (h < end) {
        const char *eol = memchr(h, '\n', (size_t)(end - h));
        const char *stop = eol ? eol : end;
        const char *line_end = stop > h && stop[-1] == '\r' ? stop - 1 : stop;
        if (line_end > h) {
            const char *colon = memchr(h, ':', (size_t)(line_end - h));
            if (!colon) {
                gw_errf(v->detail, sizeof(v->detail), "header line without a colon");
                return -1;
            }
            const char *val = colon + 1;
            while (val < line_end && (*val == ' ' || *val == '\t'))
                val++;
            waf_header(tx, h, (size_t)(colon - h), val, (size_t)(line_end - val));
        }
        h = eol ? eol + 1 : end;
    }
    return 0;
}

int gw_waf_check(gw_waf *w, int mode, const char *client_ip, int client_port, const char *method,
                 const char *uri, const char *version, const char *headers, size_t headers_len,
                 const char *body, size_t body_len, gw_verdict *out)
{
    memset(out, 0, sizeof(*out));
    Transaction *tx = waf_begin(w, out, NULL, client_ip, client_port, "127.0.0.1", 80, method, uri, version);
    if (!tx) {
        out->action = GW_ACTION_ERROR;
        return -1;
    }
    if (add_header_lines(tx, headers, headers_len, out) < 0) {
        waf_end(tx);
        out->action = GW_ACTION_ERROR;
        return -1;
    }
    int hit = waf_headers_done(tx, out);
    if (!hit) {
        if (body_len)
            waf_body(tx, body, body_len);
        hit = waf_body_done(tx, out);
    }
    waf_end(tx);
    if (hit && mode == GW_WAF_BLOCK)
        out->action = GW_ACTION_BLOCKED;
    else if (out->nrules && mode == GW_WAF_DETECT)
        out->action = GW_ACTION_DETECTED;
    else
        out->action = GW_ACTION_ALLOWED;
    return 0;
}
