"""Python API over the cffi extension; the only module that touches `native._engine`."""

from native._engine import ffi, lib  # type: ignore[import-not-found]


def crypto_version() -> str:
    """The OpenSSL build the engine links, e.g. 'OpenSSL 3.0.19 ...'."""
    return str(ffi.string(lib.ambit_crypto_version()).decode())
