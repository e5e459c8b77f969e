/* Server TLS for HTTPS listeners: one SSL_CTX per certificate, the default one's servername callback
 * switches to the certificate whose hostname matches the client's SNI (exact first, then "*.suffix" for
 * exactly one more label, RFC 6125 6.4.3); no match keeps the default. TLS 1.2 and 1.3, ALPN h2 and http/1.1. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "internal.h"

static void ssl_reason(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[256] = "";
    if (e)
        ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    gw_errf(err, errlen, "%s: %s", what, buf[0] ? buf : "unknown error");
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    static const unsigned char ours[] = "\x02h2\x08http/1.1"; /* h2 preferred */
    if (SSL_select_next_proto((unsigned char **)out, outlen, ours, sizeof(ours) - 1, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    return SSL_TLSEXT_ERR_OK;
}

static int host_matches(const char *pattern, const char *name)
{
    if (pattern[0] == '*' && pattern[1] == '.') {
        const char *dot = strchr(name, '.');
        return dot && dot != name && strcasecmp(dot, pattern + 1) == 0;
    }
    return strcasecmp(pattern, name) == 0;
}

static int on_servername(SSL *ssl, int *alert, void *arg)
{
    (void)alert;
    gw_tls *t = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!name)
        return SSL_TLSEXT_ERR_OK;
    for (int pass = 0; pass < 2; pass++) /* exact names win over wildcards */
        for (int i = 0; i < t->ncerts; i++) {
            const char *h = t->hosts[i];
            if (!h[0] || (pass == 0) == (h[0] == '*'))
                continue;
            if (host_matches(h, name)) {
                SSL_set_SSL_CTX(ssl, t->ctxs[i]);
                return SSL_TLSEXT_ERR_OK;
            }
        }
    return SSL_TLSEXT_ERR_OK;
}

static SSL_CTX *server_ctx(const char *chain, size_t chain_len, const char *key, size_t key_len, char *err,
                           size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        ssl_reason(err, errlen, "SSL_CTX_new");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    BIO *cb = BIO_new_mem_buf(chain, (int)chain_len);
    BIO *kb = BIO_new_mem_buf(key, (int)key_len);
    X509 *leaf = cb ? PEM_read_bio_X509(cb, NULL, NULL, NULL) : NULL;
    EVP_PKEY *pkey = kb ? PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL) : NULL;
    int ok = leaf && pkey && SSL_CTX_use_certificate(ctx, leaf) == 1;
    X509 *extra;
    while (ok && (extra = PEM_read_bio_X509(cb, NULL, NULL, NULL)))
        if (SSL_CTX_add1_chain_cert(ctx, extra) != 1)
            ok = 0;
        else
            X509_free(extra);
    ERR_clear_error(); /* the loop above ends on a "no start line" error */
    if (ok && (SSL_CTX_use_PrivateKey(ctx, pkey) != 1 || SSL_CTX_check_private_key(ctx) != 1))
        ok = 0;
    if (!ok) {
        if (!leaf)
            gw_errf(err, errlen, "no certificate in the chain PEM");
        else if (!pkey)
            gw_errf(err, errlen, "no private key in the key PEM");
        else
            ssl_reason(err, errlen, "certificate/key");
        SSL_CTX_free(ctx);
        ctx = NULL;
    }
    X509_free(leaf);
    EVP_PKEY_free(pkey);
    BIO_free(cb);
    BIO_free(kb);
    return ctx;
}

gw_tls *gw_tls_new(char *err, size_t errlen)
{
    gw_tls *t = calloc(1, sizeof(*t));
    if (!t)
        gw_errf(err, errlen, "out of memory");
    else
        atomic_init(&t->refs, 1);
    return t;
}

int gw_tls_add_cert(gw_tls *t, const char *hostname, const char *chain_pem, size_t chain_len,
                    const char *key_pem, size_t key_len, char *err, size_t errlen)
{
    SSL_CTX *ctx = server_ctx(chain_pem, chain_len, key_pem, key_len, err, errlen);
    if (!ctx)
        return -1;
    char **hosts = realloc(t->hosts, sizeof(*hosts) * (size_t)(t->ncerts + 1));
    if (hosts)
        t->hosts = hosts;
    SSL_CTX **ctxs = hosts ? realloc(t->ctxs, sizeof(*ctxs) * (size_t)(t->ncerts + 1)) : NULL;
    if (!ctxs) {
        SSL_CTX_free(ctx);
        gw_errf(err, errlen, "out of memory");
        return -1;
    }
    t->ctxs = ctxs;
    t->hosts[t->ncerts] = strdup(hostname);
    t->ctxs[t->ncerts] = ctx;
    t->ncerts++;
    if (!t->ctx || !hostname[0]) { /* the first certificate, or the one without a hostname, is default */
        t->ctx = ctx;
        for (int i = 0; i < t->ncerts; i++)
            SSL_CTX_set_tlsext_servername_callback(t->ctxs[i], NULL);
        SSL_CTX_set_tlsext_servername_callback(ctx, on_servername);
        SSL_CTX_set_tlsext_servername_arg(ctx, t);
    }
    return 0;
}

gw_tls *tls_retain(gw_tls *t)
{
    if (t)
        atomic_fetch_add(&t->refs, 1);
    return t;
}

void gw_tls_release(gw_tls *t)
{
    if (!t || atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    for (int i = 0; i < t->ncerts; i++) {
        SSL_CTX_free(t->ctxs[i]);
        free(t->hosts[i]);
    }
    free(t->ctxs);
    free(t->hosts);
    free(t);
}
