"""Deprecated alias of :mod:`numbarope.ops._toeplitz` (FFT Toeplitz products). This
alias goes in the next release."""

import warnings

from .ops._toeplitz import circulant_spectrum, fft_length, toeplitz_matmul  # noqa: F401

__all__ = ["fft_length", "circulant_spectrum", "toeplitz_matmul"]

warnings.warn("numbarope.toeplitz is deprecated: use numbarope.ops._toeplitz",
              DeprecationWarning, stacklevel=2)
