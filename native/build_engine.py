"""Builds the C engine as the cffi extension `native._engine` (out-of-line API mode).

Run by `make native`; the compiled module lands beside this file so the in-tree package imports it.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "src"

# Only the declarations Python may call: keep this the single C surface the package sees.
CDEF = """
const char *ambit_crypto_version(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "native._engine",
    '#include "engine.h"',
    sources=[str(p.relative_to(ROOT)) for p in sorted(SRC.glob("*.c"))],
    include_dirs=[str(SRC)],
    libraries=["ssl", "crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT), verbose=False)
