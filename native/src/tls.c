/* TLS contexts (mTLS both ways, key only in memory), peer identity extraction, client session reuse. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "internal.h"

#define SESSION_SLOTS 64
#define TLS_READ_BUFFER (128 * 1024)
#define SESSION_LIFETIME_S 600

static const unsigned char ALPN_H2[] = {2, 'h', '2'};
static const unsigned char SESSION_ID_CTX[] = "ambit-hbone";

/* Client sessions are kept per expected peer: one client context talks to many nodes, and a session
 * must only be offered to the server it came from. */
typedef struct session_slot {
    char *peer;
    SSL_SESSION *sess;
} session_slot;

typedef struct session_store {
    pthread_mutex_t lock;
    session_slot slots[SESSION_SLOTS];
    unsigned next;
} session_store;

static int store_index = -1;
static int verdict_index = -1; /* SSL ex_data: the tls_verdict of a server handshake */
static pthread_once_t store_once = PTHREAD_ONCE_INIT;

static void store_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    session_store *st = ptr;
    if (!st)
        return;
    for (int i = 0; i < SESSION_SLOTS; i++) {
        free(st->slots[i].peer);
        if (st->slots[i].sess)
            SSL_SESSION_free(st->slots[i].sess);
    }
    pthread_mutex_destroy(&st->lock);
    free(st);
}

static void store_init(void)
{
    store_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, store_free);
    verdict_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

void tls_last_error(char *buf, size_t cap, const char *what)
{
    unsigned long e = ERR_get_error();
    char reason[200] = "";
    if (e)
        ERR_error_string_n(e, reason, sizeof(reason));
    ERR_clear_error();
    snprintf(buf, cap, "%s%s%s", what, e ? ": " : "", reason);
}

static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    const char *peer = SSL_get_app_data(ssl);
    session_store *st = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), store_index);
    if (!peer || !*peer || !st)
        return 0;
    pthread_mutex_lock(&st->lock);
    session_slot *slot = NULL;
    for (int i = 0; i < SESSION_SLOTS && !slot; i++)
        if (st->slots[i].peer && !strcmp(st->slots[i].peer, peer))
            slot = &st->slots[i];
    if (!slot) {
        slot = &st->slots[st->next++ % SESSION_SLOTS];
        free(slot->peer);
        slot->peer = strdup(peer);
    }
    if (slot->sess)
        SSL_SESSION_free(slot->sess);
    slot->sess = sess;
    pthread_mutex_unlock(&st->lock);
    return 1; /* we keep the reference */
}

void tls_client_session_prepare(SSL *ssl, SSL_CTX *ctx, const char *peer)
{
    SSL_set_app_data(ssl, (void *)peer);
    session_store *st = SSL_CTX_get_ex_data(ctx, store_index);
    if (!st || !peer)
        return;
    pthread_mutex_lock(&st->lock);
    for (int i = 0; i < SESSION_SLOTS; i++)
        if (st->slots[i].peer && !strcmp(st->slots[i].peer, peer) && st->slots[i].sess) {
            SSL_set_session(ssl, st->slots[i].sess);
            break;
        }
    pthread_mutex_unlock(&st->lock);
}

/* The single URI SAN of `cert` into out (1), or 0 when it has none, several, or one that does not fit. */
static int leaf_uri(X509 *cert, char *out, size_t cap)
{
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    const ASN1_IA5STRING *uri = NULL;
    int uris = 0;
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names); i++) {
        const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
        if (gn->type == GEN_URI) {
            uri = gn->d.uniformResourceIdentifier;
            uris++;
        }
    }
    int ok = uris == 1 && uri && (size_t)uri->length < cap && memchr(uri->data, 0, (size_t)uri->length) == NULL;
    if (ok) {
        memcpy(out, uri->data, (size_t)uri->length);
        out[uri->length] = 0;
    }
    GENERAL_NAMES_free(names);
    return ok;
}

/* spiffe://TD/ns/NS/sa/SA with TD in the engine's list (the proxy's authority on the rest: api/spiffe.py);
 * anything while no list is set (engine users other than the proxy). */
static int workload_of_accepted_domain(ambit_engine *e, const char *uri)
{
    pthread_mutex_lock(&e->limits_lock);
    int ruled = e->peer_domains != NULL;
    pthread_mutex_unlock(&e->limits_lock);
    if (!ruled)
        return 1;
    const char *prefix = "spiffe://";
    if (strncmp(uri, prefix, strlen(prefix)) != 0)
        return 0;
    const char *td = uri + strlen(prefix), *slash = strchr(td, '/');
    if (!slash || slash == td)
        return 0;
    const char *p = slash;
    const char *tags[2] = {"/ns/", "/sa/"};
    for (int i = 0; i < 2; i++) {
        if (strncmp(p, tags[i], 4) != 0)
            return 0;
        p += 4;
        size_t seg = strcspn(p, "/");
        if (!seg)
            return 0;
        p += seg;
    }
    if (*p)
        return 0;
    int found = 0;
    size_t n = (size_t)(slash - td);
    pthread_mutex_lock(&e->limits_lock);
    for (const char *d = e->peer_domains; d && (d = strchr(d, '\n')) && d[1]; d++)
        if (!strncmp(d + 1, td, n) && d[1 + n] == '\n') {
            found = 1;
            break;
        }
    pthread_mutex_unlock(&e->limits_lock);
    return found;
}

int ambit_engine_set_peer_domains(ambit_engine *e, const char *domains)
{
    char *list = NULL;
    if (domains) { /* "" accepts no client at all */
        size_t n = strlen(domains);
        if (!(list = malloc(n + 3)))
            return -1;
        snprintf(list, n + 3, "\n%s\n", domains);
    }
    pthread_mutex_lock(&e->limits_lock);
    char *old = e->peer_domains;
    e->peer_domains = list;
    pthread_mutex_unlock(&e->limits_lock);
    free(old);
    return 0;
}

void tls_verdict_attach(SSL *ssl, tls_verdict *v) { SSL_set_ex_data(ssl, verdict_index, v); }

static void on_tls_info(const SSL *ssl, int where, int ret)
{
    (void)ret;
    tls_verdict *v = (where & SSL_CB_WRITE_ALERT) ? SSL_get_ex_data(ssl, verdict_index) : NULL;
    if (v)
        v->alert_sent = 1;
}

/* Checks on the peer's leaf, inside verification so that a refusal sends a TLS alert (never a bare EOF):
 * an end entity must be CA:false (a leaf that can sign: basicConstraints CA:true, or keyCertSign), on both
 * sides; a server also requires the client's single URI SAN to be a workload of an accepted trust domain.
 * Refused as X509_V_ERR_APPLICATION_VERIFICATION; the reason goes to the verdict (hbone.c reports it). */
static int verify_leaf(int ok, X509_STORE_CTX *store)
{
    if (X509_STORE_CTX_get_error_depth(store) != 0)
        return ok;
    X509 *leaf = X509_STORE_CTX_get_current_cert(store);
    SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    tls_verdict *v = ssl && verdict_index >= 0 ? SSL_get_ex_data(ssl, verdict_index) : NULL;
    int has_uri = v && v->server && leaf_uri(leaf, v->presented, v->presented_cap); /* claimed, for the audit */
    if (!ok)
        return 0;
    const char *why = NULL;
    if (X509_check_ca(leaf))
        why = "peer leaf certificate is a CA (CA:true)";
    if (v && v->server && !why) {
        if (!has_uri)
            why = "peer certificate has no single URI SAN";
        else if (!workload_of_accepted_domain(v->engine, v->presented))
            why = "peer identity is no workload of an accepted trust domain";
    }
    if (!why)
        return 1;
    if (v)
        v->why = why;
    X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
}

int ambit_cert_is_ca(const char *pem, size_t len)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    int rv = x ? X509_check_ca(x) != 0 : -1;
    X509_free(x);
    BIO_free(bio);
    ERR_clear_error();
    return rv;
}

static int select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg)
{
    (void)ssl, (void)arg;
    unsigned char *sel;
    if (SSL_select_next_proto(&sel, outlen, ALPN_H2, sizeof(ALPN_H2), in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static int load_chain(SSL_CTX *ctx, const char *pem, size_t len, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    X509 *leaf = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    int ok = leaf && SSL_CTX_use_certificate(ctx, leaf) == 1;
    X509_free(leaf);
    X509 *x;
    while (ok && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)))
        if (SSL_CTX_add0_chain_cert(ctx, x) != 1) {
            X509_free(x);
            ok = 0;
        }
    ERR_clear_error(); /* the loop ends on a "no start line" error */
    BIO_free(bio);
    if (!ok)
        snprintf(err, errlen, "bad certificate chain PEM");
    return ok;
}

static int load_key(SSL_CTX *ctx, const char *pem, size_t len, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    EVP_PKEY *key = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    int ok = key && SSL_CTX_use_PrivateKey(ctx, key) == 1 && SSL_CTX_check_private_key(ctx) == 1;
    EVP_PKEY_free(key);
    BIO_free(bio);
    if (!ok)
        snprintf(err, errlen, "bad private key or key does not match the certificate");
    ERR_clear_error();
    return ok;
}

static int load_bundle(SSL_CTX *ctx, const char *pem, size_t len, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    int n = 0;
    X509 *x;
    while (bio && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
        if (X509_STORE_add_cert(store, x) == 1)
            n++;
        X509_free(x);
    }
    ERR_clear_error();
    BIO_free(bio);
    if (!n)
        snprintf(err, errlen, "trust bundle holds no certificate");
    return n > 0;
}

SSL_CTX *tls_ctx_build(int server, const char *chain, size_t chain_len, const char *key, size_t key_len,
                       const char *bundle, size_t bundle_len, int tls12, char *err, size_t errlen)
{
    pthread_once(&store_once, store_init);
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        tls_last_error(err, errlen, "SSL_CTX_new");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, tls12 ? TLS1_2_VERSION : TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    /* Partial writes let one SSL_write move a large buffer as many records without copying it aside. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_leaf);
    SSL_CTX_set_info_callback(ctx, on_tls_info);
    /* Read ahead with a large buffer: one recv() brings many records instead of two syscalls per record. */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, TLS_READ_BUFFER);
    /* AES-128-GCM first: the same AEAD strength class as 256 for this use, and markedly faster. */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    if (!load_chain(ctx, chain, chain_len, err, errlen) || !load_key(ctx, key, key_len, err, errlen) ||
        !load_bundle(ctx, bundle, bundle_len, err, errlen)) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    /* A resumed session skips the certificate exchange: keep that window well under an SVID's lifetime. */
    SSL_CTX_set_timeout(ctx, SESSION_LIFETIME_S);
    if (server) {
        SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);
        SSL_CTX_set_session_id_context(ctx, SESSION_ID_CTX, sizeof(SESSION_ID_CTX) - 1);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    } else {
        SSL_CTX_set_alpn_protos(ctx, ALPN_H2, sizeof(ALPN_H2));
        session_store *st = calloc(1, sizeof(*st));
        if (st) {
            pthread_mutex_init(&st->lock, NULL);
            SSL_CTX_set_ex_data(ctx, store_index, st);
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
            SSL_CTX_sess_set_new_cb(ctx, on_new_session);
        }
    }
    return ctx;
}

void tls_peer_info(SSL *ssl, ambit_event *ev)
{
    copy_str(ev->tls_version, sizeof(ev->tls_version), SSL_get_version(ssl));
    copy_str(ev->tls_cipher, sizeof(ev->tls_cipher), SSL_get_cipher_name(ssl));
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (!peer)
        return;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (X509_digest(peer, EVP_sha256(), md, &mdlen) == 1)
        for (unsigned i = 0; i < mdlen && 2 * i + 2 < sizeof(ev->peer_cert_sha256); i++)
            snprintf(ev->peer_cert_sha256 + 2 * i, 3, "%02x", md[i]);
    /* A SPIFFE SVID carries exactly one URI SAN; anything else yields no identity. */
    if (!leaf_uri(peer, ev->peer_id, sizeof(ev->peer_id)))
        ev->peer_id[0] = 0;
}
