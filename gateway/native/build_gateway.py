"""Builds the gateway data plane as the cffi extension `gateway.native._gateway` (out-of-line API mode).

Run by `make gateway`; links libmodsecurity (Debian libmodsecurity3), OpenSSL, and compiles llhttp from the
C sources Debian's node-llhttp package ships (/usr/share/llhttp), so nothing is vendored here.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SRC = HERE / "src"
LLHTTP_SRC = Path("/usr/share/llhttp")
LLHTTP_INCLUDE = Path("/usr/share/include/llhttp")
HEADER = SRC / "gw.h"
# AMBIT_ENGINE_SANITIZE=address builds an ASan gateway too (as native/build_engine.py; docs/engine.md).
_SANITIZER = os.environ.get("AMBIT_ENGINE_SANITIZE", "")
SANITIZE = [f"-fsanitize={_SANITIZER}", "-fno-omit-frame-pointer", "-g"] if _SANITIZER else []


def cdef_from_header(text: str) -> str:
    """gw.h is the single C surface Python sees: its declarations minus preprocessor lines."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")) + "\n"


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "gateway.native._gateway",
    '#include "gw.h"',
    # the engine's byte buffers (native/src/util.c) are shared, not copied
    sources=[str(p) for p in sorted(SRC.glob("*.c"))]
    + [str(ROOT / "native" / "src" / "util.c")]
    + [str(LLHTTP_SRC / name) for name in ("llhttp.c", "api.c", "http.c")],
    include_dirs=[str(SRC), str(LLHTTP_INCLUDE)],
    libraries=["modsecurity", "ssl", "crypto", "nghttp2", "pthread"],
    extra_compile_args=[
        "-O2", "-Wall", "-Wextra", "-std=gnu11", "-D_GNU_SOURCE", "-Wno-unused-parameter", *SANITIZE,
    ],
    extra_link_args=SANITIZE,
)

if __name__ == "__main__":
    import shutil

    os.chdir(ROOT)
    # Objects (llhttp's included, whose paths are absolute) go under build/; only the module lands here.
    built = Path(ffibuilder.compile(tmpdir=str(ROOT / "build" / "gateway"), verbose=False))
    shutil.copy2(built, HERE / built.name)
