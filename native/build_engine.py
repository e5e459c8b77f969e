"""Builds the C engine as the cffi extension `native._engine` (out-of-line API mode).

Run by `make native`; the compiled module lands beside this file so the in-tree package imports it.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "src"

HEADER = SRC / "engine.h"


def cdef_from_header(text: str) -> str:
    """engine.h is the single C surface Python sees: its declarations minus preprocessor lines (cffi's
    cdef takes no #include/#ifndef; it strips the comments itself). Deterministic, so builds reproduce."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")) + "\n"


CDEF = cdef_from_header(HEADER.read_text())
# AMBIT_ENGINE_SANITIZE=address builds an ASan engine (run it with libasan preloaded: docs/engine.md).
_SANITIZER = os.environ.get("AMBIT_ENGINE_SANITIZE", "")
SANITIZE = [f"-fsanitize={_SANITIZER}", "-fno-omit-frame-pointer", "-g"] if _SANITIZER else []

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "native._engine",
    '#include "engine.h"',
    sources=[str(p.relative_to(ROOT)) for p in sorted(SRC.glob("*.c"))],
    include_dirs=[str(SRC)],
    libraries=["ssl", "crypto", "nghttp2", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-D_GNU_SOURCE", *SANITIZE],
    extra_link_args=SANITIZE,
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT), verbose=False)
