/* Keys, CSRs and certificate facts for the agent's identity code, on the OpenSSL the engine links anyway:
 * the agent then maps no second crypto library (cryptography's Rust bindings cost ~9 MiB resident). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "engine.h"

static int fail(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    if (err && errlen) {
        if (e)
            snprintf(err, errlen, "%s: %s", what, ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "?");
        else
            snprintf(err, errlen, "%s", what);
    }
    ERR_clear_error();
    return -1;
}

/* The BIO's bytes as a NUL-terminated malloc'd string (NULL when out of memory). */
static char *bio_string(BIO *bio)
{
    char *data;
    long n = BIO_get_mem_data(bio, &data);
    char *out = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (out) {
        memcpy(out, data, (size_t)n);
        out[n] = '\0';
    }
    return out;
}

void ambit_pki_free(char *p)
{
    if (p)
        OPENSSL_cleanse(p, strlen(p));
    free(p);
}

static int add_uri_san(X509_REQ *req, const char *uri)
{
    GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();
    GENERAL_NAME *name = GENERAL_NAME_new();
    ASN1_IA5STRING *value = ASN1_IA5STRING_new();
    STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();
    int ok = names && name && value && exts && ASN1_STRING_set(value, uri, (int)strlen(uri));
    if (ok) {
        GENERAL_NAME_set0_value(name, GEN_URI, value);
        value = NULL;
        ok = sk_GENERAL_NAME_push(names, name) > 0;
        if (ok)
            name = NULL;
    }
    X509_EXTENSION *ext = ok ? X509V3_EXT_i2d(NID_subject_alt_name, 1, names) : NULL;
    ok = ext && sk_X509_EXTENSION_push(exts, ext) > 0;
    if (!ok)
        X509_EXTENSION_free(ext);
    ok = ok && X509_REQ_add_extensions(req, exts);
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    GENERAL_NAMES_free(names);
    GENERAL_NAME_free(name);
    ASN1_IA5STRING_free(value);
    return ok;
}

int ambit_pki_key_and_csr(const char *uri, char **key_pem, char **csr_pem, char *err, size_t errlen)
{
    *key_pem = *csr_pem = NULL;
    int rv = -1;
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509_REQ *req = X509_REQ_new();
    /* The key's PEM goes through secure memory where there is some, and is wiped when freed either way. */
    BIO *kbio = BIO_new(BIO_s_secmem());
    BIO *cbio = BIO_new(BIO_s_mem());
    if (!key || !req || !kbio || !cbio) {
        fail(err, errlen, "key generation");
        goto out;
    }
    if (!X509_REQ_set_version(req, 0) || !X509_REQ_set_pubkey(req, key) || (uri && !add_uri_san(req, uri)) ||
        !X509_REQ_sign(req, key, EVP_sha256())) {
        fail(err, errlen, "CSR");
        goto out;
    }
    if (!PEM_write_bio_PrivateKey(kbio, key, NULL, NULL, 0, NULL, NULL) || !PEM_write_bio_X509_REQ(cbio, req)) {
        fail(err, errlen, "PEM encoding");
        goto out;
    }
    *key_pem = bio_string(kbio);
    *csr_pem = bio_string(cbio);
    if (!*key_pem || !*csr_pem) {
        ambit_pki_free(*key_pem);
        ambit_pki_free(*csr_pem);
        *key_pem = *csr_pem = NULL;
        fail(err, errlen, "out of memory");
        goto out;
    }
    rv = 0;
out:
    BIO_free(kbio);
    BIO_free(cbio);
    X509_REQ_free(req);
    EVP_PKEY_free(key);
    return rv;
}

/* Every certificate of a PEM chain, in order (NULL when it holds none or one does not parse). */
static STACK_OF(X509) *read_chain(const char *pem, size_t len)
{
    if (len > 0x7fffffff)
        return NULL;
    ERR_clear_error(); /* the end of the input is told apart by the error it leaves */
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    STACK_OF(X509) *chain = bio ? sk_X509_new_null() : NULL;
    X509 *x;
    while (chain && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        if (sk_X509_push(chain, x) <= 0) {
            X509_free(x);
            sk_X509_pop_free(chain, X509_free);
            chain = NULL;
        }
    }
    /* The loop ends at the end of the input (PEM_R_NO_START_LINE) or at a block that does not parse. */
    unsigned long e = ERR_peek_last_error();
    int clean_end = ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
    if (chain && (sk_X509_num(chain) == 0 || (e && !clean_end))) {
        sk_X509_pop_free(chain, X509_free);
        chain = NULL;
    }
    ERR_clear_error();
    BIO_free(bio);
    return chain;
}

static int unix_time(const ASN1_TIME *t, int64_t *out)
{
    struct tm tm;
    if (!t || !ASN1_TIME_to_tm(t, &tm))
        return 0;
    *out = (int64_t)timegm(&tm);
    return 1;
}

static void name_string(const X509_NAME *name, char *out, size_t outlen)
{
    out[0] = '\0';
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio && X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253) >= 0) {
        char *data;
        long n = BIO_get_mem_data(bio, &data);
        size_t k = n < 0 ? 0 : (size_t)n < outlen - 1 ? (size_t)n : outlen - 1;
        memcpy(out, data, k);
        out[k] = '\0';
    }
    BIO_free(bio);
}

static int uri_sans(X509 *x, ambit_cert_facts *out, char *err, size_t errlen)
{
    int crit = 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(x, NID_subject_alt_name, &crit, NULL);
    if (!names)
        return crit == -1 ? 0 : fail(err, errlen, "SAN extension duplicated or malformed");
    int rv = 0;
    for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
        const GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
        if (name->type != GEN_URI)
            continue;
        const ASN1_IA5STRING *uri = name->d.uniformResourceIdentifier;
        int n = ASN1_STRING_length(uri);
        const unsigned char *bytes = ASN1_STRING_get0_data(uri);
        if (n < 0 || (size_t)n >= sizeof(out->uri) || (n > 0 && memchr(bytes, '\0', (size_t)n))) {
            rv = fail(err, errlen, "URI SAN too long or with a NUL byte");
            break;
        }
        if (out->uri_count++ == 0 && n > 0) {
            memcpy(out->uri, bytes, (size_t)n);
            out->uri[n] = '\0';
        }
    }
    GENERAL_NAMES_free(names);
    return rv;
}

int ambit_pki_cert_facts(const char *pem, size_t len, int index, ambit_cert_facts *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    STACK_OF(X509) *chain = read_chain(pem, len);
    if (!chain)
        return fail(err, errlen, "no PEM certificate, or one that does not parse");
    int count = sk_X509_num(chain);
    int rv = count;
    X509 *x = index >= 0 && index < count ? sk_X509_value(chain, index) : NULL;
    if (!x) {
        rv = fail(err, errlen, "no certificate at that index");
        goto out;
    }
    BIGNUM *serial = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex = serial ? BN_bn2hex(serial) : NULL;
    int hex_fits = hex && strlen(hex) < sizeof(out->serial_hex);
    if (hex_fits)
        strcpy(out->serial_hex, hex);
    OPENSSL_free(hex);
    BN_free(serial);
    if (!hex_fits || !unix_time(X509_get0_notBefore(x), &out->not_before) ||
        !unix_time(X509_get0_notAfter(x), &out->not_after)) {
        rv = fail(err, errlen, "serial number or validity does not parse");
        goto out;
    }
    name_string(X509_get_subject_name(x), out->subject, sizeof(out->subject));
    name_string(X509_get_issuer_name(x), out->issuer, sizeof(out->issuer));
    if (uri_sans(x, out, err, errlen) < 0)
        rv = -1;
out:
    sk_X509_pop_free(chain, X509_free);
    ERR_clear_error();
    return rv;
}

int ambit_pki_last_signed_by(const char *chain_pem, size_t chain_len, const char *issuer_pem, size_t issuer_len)
{
    STACK_OF(X509) *chain = read_chain(chain_pem, chain_len);
    STACK_OF(X509) *issuers = read_chain(issuer_pem, issuer_len);
    int rv = -1;
    if (chain && issuers) {
        X509 *top = sk_X509_value(chain, sk_X509_num(chain) - 1);
        X509 *issuer = sk_X509_value(issuers, 0);
        EVP_PKEY *key = X509_get0_pubkey(issuer);
        rv = key && X509_NAME_cmp(X509_get_issuer_name(top), X509_get_subject_name(issuer)) == 0 &&
             X509_verify(top, key) == 1;
    }
    sk_X509_pop_free(chain, X509_free);
    sk_X509_pop_free(issuers, X509_free);
    ERR_clear_error();
    return rv;
}

/* Never a pass phrase prompt (OpenSSL's default callback reads the terminal): an encrypted key is refused. */
static int no_pass_phrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return 0;
}

int ambit_pki_cert_has_key(const char *cert_pem, size_t cert_len, const char *key_pem, size_t key_len)
{
    STACK_OF(X509) *chain = read_chain(cert_pem, cert_len);
    BIO *bio = key_len <= 0x7fffffff ? BIO_new_mem_buf(key_pem, (int)key_len) : NULL;
    EVP_PKEY *key = bio ? PEM_read_bio_PrivateKey(bio, NULL, no_pass_phrase, NULL) : NULL;
    EVP_PKEY *pub = chain ? X509_get0_pubkey(sk_X509_value(chain, 0)) : NULL;
    int rv = key && pub ? EVP_PKEY_eq(pub, key) == 1 : -1;
    EVP_PKEY_free(key);
    BIO_free(bio);
    sk_X509_pop_free(chain, X509_free);
    ERR_clear_error();
    return rv;
}
