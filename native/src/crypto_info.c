#include <openssl/crypto.h>

#include "engine.h"

const char *ambit_crypto_version(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}
