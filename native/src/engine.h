/* The C engine's public surface: everything Python calls is declared here and in build_engine.py's CDEF. */
#ifndef AMBIT_ENGINE_H
#define AMBIT_ENGINE_H

/* Name and version of the crypto module the engine is linked against (reported for FIPS audits). */
const char *ambit_crypto_version(void);

#endif
