"""Triton, or stand-ins where it is not installed (it ships for Linux only: pyproject.toml).

Every kernel file imports `triton` and `tl` from here, so that its torch reference, which the model
uses on CPU, imports anywhere: without Triton, `@triton.jit` leaves the kernels plain functions and
`tl.constexpr` is the identity, and the kernel switch (c2a.kernels.backend) refuses C2A_KERNELS=triton.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    from types import SimpleNamespace

    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=lambda value: value)
