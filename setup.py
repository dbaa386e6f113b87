"""The compiled data path (overlay/_fast.c, docs/datapath.md), built against OpenSSL's libcrypto for AES-256-GCM
and, where its headers are installed (Debian's libipsec-mb-dev, amd64), Intel's ipsec-mb, which takes the cipher
over where it runs its AVX2 or AVX-512 code (overlay/_gcm.h); everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import Extension, setup

IPSEC_MB = Path("/usr/include/intel-ipsec-mb.h").exists()

setup(
    ext_modules=[
        Extension(
            "overlay._fast",
            sources=["overlay/_fast.c"],
            depends=sorted(str(p) for p in Path("overlay").glob("_*.h")),  # its parts (overlay/_fast.c)
            libraries=["crypto", *(["IPSec_MB"] if IPSEC_MB else [])],
            define_macros=[("HAVE_IPSEC_MB", "1")] if IPSEC_MB else [],
            extra_compile_args=[
                "-O2",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-Wno-cast-function-type",
            ],
        )
    ]
)
