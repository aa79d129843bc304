"""An independent reference for rounding float64 to a 16-bit float: integer arithmetic.

The server rounds a float64 average into the tensor's type with numpy's cast (F16) or
ml_dtypes' (BF16). Tests compare those casts, and the models the server writes,
against this: round to nearest, ties to even, done on the bits of the float64 with
Python integers, so that nothing here goes through a float cast that could round twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Format:
    """A binary float format with ``exp_bits`` exponent and ``man_bits`` fraction bits."""

    exp_bits: int
    man_bits: int

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """The exponent of the smallest normal number."""
        return 1 - self.bias


BF16 = Format(exp_bits=8, man_bits=7)
F16 = Format(exp_bits=5, man_bits=10)


def round_bits(x: float, fmt: Format) -> int:
    """The 16-bit pattern of ``x`` rounded to nearest, ties to even, into ``fmt``."""
    bits: int = struct.unpack("<Q", struct.pack("<d", x))[0]
    sign = (bits >> 63) << (fmt.exp_bits + fmt.man_bits)
    e64, m64 = (bits >> 52) & 0x7FF, bits & ((1 << 52) - 1)
    inf = ((1 << fmt.exp_bits) - 1) << fmt.man_bits
    if e64 == 0x7FF:
        return sign | inf | (1 << (fmt.man_bits - 1) if m64 else 0)  # inf, or a quiet NaN
    if e64 == 0:  # float64 subnormals lie far below half of any 16-bit float's least step
        sig, exp = m64, -1074
        top = -1023
    else:
        sig, exp = m64 | (1 << 52), e64 - 1075  # |x| = sig * 2**exp
        top = e64 - 1023  # floor(log2 |x|)
    # the step of the result: one unit in the last place of x's binade, or of the
    # subnormals below the smallest normal
    q = max(top - fmt.man_bits, fmt.emin - fmt.man_bits)
    shift = min(q - exp, 60)  # beyond 55 bits sig is below half a step either way
    n, rem, half = sig >> shift, sig & ((1 << shift) - 1), 1 << (shift - 1)
    if rem > half or (rem == half and n & 1):
        n += 1
    if n == 0:
        return sign
    if n < (1 << fmt.man_bits):  # subnormal
        return sign | n
    if n == 1 << (fmt.man_bits + 1):  # rounded up into the next binade
        n, q = n >> 1, q + 1
    field = q + fmt.man_bits + fmt.bias
    if field >= (1 << fmt.exp_bits) - 1:
        return sign | inf
    return sign | (field << fmt.man_bits) | (n - (1 << fmt.man_bits))


def round_array(x: npt.NDArray[np.float64], fmt: Format) -> npt.NDArray[np.uint16]:
    """``round_bits`` of every element, as an array of bit patterns of ``x``'s shape."""
    flat = [round_bits(float(v), fmt) for v in np.asarray(x, dtype=np.float64).reshape(-1)]
    return np.array(flat, dtype=np.uint16).reshape(np.shape(x))
