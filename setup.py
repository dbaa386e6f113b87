"""The compiled data path (overlay/_fast.c, docs/datapath.md), built against OpenSSL's libcrypto for AES-256-GCM;
everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "overlay._fast",
            sources=["overlay/_fast.c"],
            libraries=["crypto"],
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
