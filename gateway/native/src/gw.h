/* The gateway data plane's C surface: the single declaration Python sees (build_gateway.py hands this file
 * to cffi as its cdef, preprocessor lines stripped), so it holds plain declarations only. */
#include <stddef.h>
#include <stdint.h>

enum {
    GW_ERR_LEN = 512,
    GW_RULES_LEN = 2048,
    GW_MAX_ROUTE_SLOTS = 1024,
};

/* What the WAF decided for one request. */
enum {
    GW_WAF_OFF = 0,      /* route mode: no inspection */
    GW_WAF_DETECT = 1,   /* route mode: inspect, never block */
    GW_WAF_BLOCK = 2,    /* route mode: inspect, block on an intervention, fail closed on errors */
};
enum {
    GW_ACTION_ALLOWED = 0,
    GW_ACTION_BLOCKED = 1,
    GW_ACTION_DETECTED = 2,  /* detect-only route: rules matched, request forwarded */
    GW_ACTION_ERROR = 3,     /* WAF error: refused on blocking routes, forwarded on detect-only ones */
    GW_ACTION_REFUSED = 4,   /* broke HTTP or a limit: 400, 408, 413, 431 */
    GW_ACTION_COUNT = 5,
};

typedef struct gw_verdict {
    int action;
    int status;              /* HTTP status of the intervention (0 when none) */
    int score;               /* inbound anomaly score (0 when no rule matched) */
    int nrules;              /* rule matches seen, also those not kept in `rules` */
    char rules[2048];        /* one "id\tmessage\n" line per matched rule, in order, cut to fit */
    char detail[256];        /* WAF error text */
} gw_verdict;

/* ---- WAF rule sets (libmodsecurity RulesSet + CRS) ---- */
typedef struct gw_waf gw_waf;
/* Compiles `rules` (SecLang text). NULL with the parser's reason in err on a bad rule. */
gw_waf *gw_waf_new(const char *rules, char *err, size_t errlen);
void gw_waf_release(gw_waf *w);
const char *gw_waf_version(void);
/* One whole request through `w` outside the data path (tests, `ambit gateway waf-check`). `headers` holds
 * "Name: value\r\n" lines. Returns 0, or -1 on a WAF error (verdict.detail says why). */
int gw_waf_check(gw_waf *w, int mode, const char *client_ip, int client_port, const char *method,
                 const char *uri, const char *version, const char *headers, size_t headers_len,
                 const char *body, size_t body_len, gw_verdict *out);

/* ---- TLS: certificates of one HTTPS listener, chosen by SNI ---- */
typedef struct gw_tls gw_tls;
gw_tls *gw_tls_new(char *err, size_t errlen);
/* hostname: "" for the default certificate, "name" exact, "*.suffix" one label. TLS 1.2 and 1.3. */
int gw_tls_add_cert(gw_tls *t, const char *hostname, const char *chain_pem, size_t chain_len,
                    const char *key_pem, size_t key_len, char *err, size_t errlen);
void gw_tls_release(gw_tls *t);

/* ---- Config: listeners, backends, routes; immutable once applied ---- */
typedef struct gw_config gw_config;

typedef struct gw_route_spec {
    int listener_id;
    const char *hostname;    /* "" any, "*.suffix" wildcard, else exact (lower case) */
    int path_exact;          /* 1 Exact, 0 PathPrefix (element-wise, Gateway API) */
    const char *path;
    const char *headers;     /* "name\nvalue\n" pairs, names lower case, exact value match */
    const char *method;      /* "" any, else the exact method */
    int backend;             /* index from gw_config_backend, -1 answers 500 */
    gw_waf *waf;             /* NULL: no WAF */
    int waf_mode;
    size_t max_body;         /* request body limit (413 above it) */
    int stat_slot;           /* counters slot of this route, 0..GW_MAX_ROUTE_SLOTS-1 */
    const char *name;        /* route name for events */
} gw_route_spec;

gw_config *gw_config_new(void);
int gw_config_listener(gw_config *c, int listener_id, gw_tls *tls);  /* tls NULL: plain HTTP */
/* addrs: "ip:port" separated by spaces (IPv6 as [ip]:port); returns the backend index or -1. */
int gw_config_backend(gw_config *c, const char *addrs, char *err, size_t errlen);
/* A backend whose connections Python makes (e.g. HBONE streams through the mesh engine): each new upstream
 * connection is asked for with a GW_EVENT_UPSTREAM event and arrives through gw_upstream_ready. */
int gw_config_backend_external(gw_config *c, int provider, char *err, size_t errlen);
/* Routes are tried in the order added: the caller sorts them by Gateway API precedence. */
int gw_config_route(gw_config *c, const gw_route_spec *spec, char *err, size_t errlen);
void gw_config_release(gw_config *c);

/* ---- The data plane ---- */
typedef struct gw_limits {
    size_t max_header_bytes;     /* request line + headers (431 above) */
    int max_headers;             /* header count (431 above) */
    int header_timeout_ms;       /* accept/TLS/request head deadline (408) */
    int body_timeout_ms;         /* whole request body deadline (408) */
    int idle_timeout_ms;         /* keep-alive between requests */
    int upstream_timeout_ms;     /* connect + response head from the backend (504) */
    int max_connections;         /* client connections per gateway (over it: accepted and closed) */
    int event_queue;             /* WAF events held for Python (over it: dropped, counted) */
} gw_limits;

enum {
    GW_EVENT_WAF = 0,        /* a WAF decision to audit */
    GW_EVENT_UPSTREAM = 1,   /* a request waits for a connected fd of backend `provider`: gw_upstream_ready */
};

typedef struct gw_event {
    int kind;                /* GW_EVENT_* */
    int provider;            /* GW_EVENT_UPSTREAM: the backend's provider id */
    uint64_t token;          /* GW_EVENT_UPSTREAM: hand back with the fd */
    int action;              /* GW_ACTION_* */
    int status;              /* what the client was answered */
    int stat_slot;
    int score;
    int nrules;
    char request_id[24];
    char route[128];
    char client[64];         /* "ip:port" */
    char host[128];
    char method[24];
    char uri[256];
    char rules[2048];
    char detail[256];
} gw_event;

typedef struct gw gw;
const char *gw_counter_name(int index);
gw *gw_new(int threads, const gw_limits *limits, char *err, size_t errlen);
/* Registers a bound, listening socket (the gateway owns it from here). Before gw_start only. */
int gw_listen(gw *g, int fd, int listener_id, char *err, size_t errlen);
int gw_start(gw *g, char *err, size_t errlen);
/* Swaps the live config; requests already started finish on the one they began with. */
void gw_apply(gw *g, gw_config *c);
void gw_stop(gw *g);         /* joins the loops, closes every fd, frees everything */
int gw_eventfd(gw *g);       /* readable while events are pending */
int gw_events(gw *g, gw_event *out, int max);
void gw_counters(gw *g, uint64_t *out, int n);
void gw_route_stats(gw *g, int slot, uint64_t *out);   /* GW_ACTION_COUNT values */
/* The connected fd for a GW_EVENT_UPSTREAM token (-1: could not connect, the client gets 502). The gateway
 * owns fd from here, also when the request is gone (it is closed). */
int gw_upstream_ready(gw *g, uint64_t token, int fd);
