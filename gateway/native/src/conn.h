/* Connection and upstream objects shared by http1.c and h2.c; never seen by cffi. */
#ifndef GW_CONN_H
#define GW_CONN_H

#include "internal.h"

/* Header fields as llhttp reports them (a name or value may come in several pieces): offsets into one
 * byte buffer, so the pieces of one field stay contiguous. */
typedef struct hdr_list {
    struct hdr *v;
    int n, cap, in_value;
} hdr_list;
int hdr_list_field(hdr_list *l, abuf *store, const char *at, size_t len);  /* -1: out of memory */
void hdr_list_value(hdr_list *l, abuf *store, const char *at, size_t len);
static inline void hdr_list_clear(hdr_list *l) { l->n = l->in_value = 0; }

typedef struct gw_h2 gw_h2;
typedef struct h2_stream h2_stream;

enum { ST_HEAD, ST_BODY, ST_WAIT };
enum { DL_NONE, DL_HEAD, DL_BODY, DL_UPSTREAM, DL_IDLE };

typedef struct hdr {
    size_t name_off, name_len, val_off, val_len;
} hdr;

struct gw_upstream {
    ep_item ep;
    gw_loop *loop;
    gw_upstream *next;       /* idle list */
    int fd;
    int dead;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    gw_conn *conn;           /* the client exchange it serves; NULL while idle */
    abuf out;
    llhttp_t parser;
    int resp_done, got_bytes, reused, eof;
    uint64_t idle_since;
};

struct gw_conn {
    ep_item ep;
    gw_loop *loop;
    gw_conn *next, *prev;
    int fd;
    int dead;
    SSL *ssl;
    int handshaking;
    int listener_id;
    char client_ip[INET6_ADDRSTRLEN];
    int client_port;
    char local_ip[INET6_ADDRSTRLEN];
    int local_port;
    int closing;             /* close once `out` is flushed */
    int state;
    int deadline_kind;
    uint64_t deadline;
    abuf in, out;
    llhttp_t parser;
    /* the request in progress */
    gw_config *cfg;
    abuf head;               /* URL and header bytes; hdrs index into it */
    size_t url_len;
    hdr_list hdrs;
    abuf body;
    const gw_route *route;
    Transaction *tx;
    gw_verdict verdict;
    char request_id[24];
    int early_status, early_action;
    int req_keepalive, is_head;
    gw_upstream *up;
    int retried;
    int is_tls;              /* arrived over TLS (x-forwarded-proto), also for an h2 stream's request */
    uint64_t await_token;    /* waiting for an external backend's connection (gw_upstream_ready) */
    gw_h2 *h2;               /* this connection speaks HTTP/2 (ALPN h2 or prior knowledge) */
    h2_stream *stream;       /* this is one HTTP/2 stream's request: no fd, bytes go through h2.c */
};


static inline const char *hdr_name(const gw_conn *c, const hdr *h) { return c->head.data + h->name_off; }
static inline const char *hdr_val(const gw_conn *c, const hdr *h) { return c->head.data + h->val_off; }

/* http1.c, for upstream.c: the client side of an exchange */
void http1_respond(gw_conn *c, int status, int action, const char *detail);  /* then close */
int http1_flush(gw_conn *c);          /* c->out to the client (socket, TLS or h2 stream); -1 on error */
void http1_deadline(gw_conn *c, int kind, int ms);
void http1_exchange_done(gw_conn *c, gw_upstream *u);   /* response complete: pool u, next request */

/* upstream.c */
void upstream_start(gw_conn *c);      /* the request is in and allowed: send it to the route's backend */
void upstream_kill(gw_upstream *u);
void upstream_drive(gw_upstream *u);   /* send the request, relay what the backend sent */
void upstream_pool_put(gw_loop *l, gw_upstream *u);
void upstream_pool_expire(gw_loop *l, uint64_t now);   /* UINT64_MAX: all */
void upstream_reap(void);

/* http1.c, for h2.c: a request-side connection without a socket for one h2 stream, fed with the stream's
 * request as HTTP/1.1 bytes; its answer comes back through h2_stream_output. */
gw_conn *http1_stream_conn(gw_conn *parent, h2_stream *st);
void http1_push_input(gw_conn *c, const char *data, size_t len);
void http1_kill(gw_conn *c);
void http1_drive(gw_conn *c);
int http1_flush_socket(gw_conn *c);   /* writes c->out to the socket/TLS; -1 on error */

/* h2.c */
int h2_start(gw_conn *c);                                  /* -1: out of memory */
int h2_feed(gw_conn *c, const char *data, size_t len);     /* -1: protocol error, close */
int h2_send(gw_conn *c);                                   /* session output into c->out */
size_t h2_stream_output(h2_stream *st, const char *data, size_t len);  /* bytes taken */
void h2_stream_detach(h2_stream *st);                      /* the stream's conn is gone */
void h2_close(gw_conn *c);                                 /* the connection is dying */
int h2_wants_close(gw_conn *c);                            /* GOAWAY done and nothing pending */
extern const char H2_PREFACE[24];

#endif
