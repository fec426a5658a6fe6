"""Bit-exact packing of small integer codes into a dense little-endian bitstream.

Code ``i`` (in flattened row-major order) occupies bits ``[i*bits, (i+1)*bits)`` of the
stream, least significant bit first; byte ``k`` holds stream bits ``8k .. 8k+7``. The last
byte is padded with zero bits, so ``n`` codes take exactly ``ceil(n*bits/8)`` bytes.
2, 4 and 8 bits have byte-aligned fast paths that produce the same layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of the bitstream that holds ``numel`` codes of ``bits`` bits."""
    return math.ceil(numel * bits / 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (0 <= code < 2**bits, any shape) into a 1-D uint8 bitstream."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    c = codes.detach().cpu().reshape(-1)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: min {int(c.min())}, max {int(c.max())}")
    c = c.to(torch.uint8).numpy()
    n = c.size
    if bits == 8:
        out = c.copy()
    elif bits == 1:
        out = np.packbits(c, bitorder="little")
    elif bits in (2, 4):
        per = 8 // bits  # codes per byte
        c = np.pad(c, (0, -n % per)).reshape(-1, per)
        out = np.zeros(c.shape[0], dtype=np.uint8)
        for j in range(per):
            out |= c[:, j] << np.uint8(j * bits)
    else:
        stream = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]
        out = np.packbits(stream.reshape(-1), bitorder="little")
    assert out.size == packed_nbytes(n, bits)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_codes`: a uint8 tensor of ``shape``."""
    _check_bits(bits)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"packed has {packed.numel()} bytes; {n} codes of {bits} bits need {packed_nbytes(n, bits)}")
    p = packed.detach().cpu().numpy()
    if bits == 8:
        c = p.copy()
    elif bits == 1:
        c = np.unpackbits(p, bitorder="little")[:n]
    elif bits in (2, 4):
        per, mask = 8 // bits, np.uint8(2**bits - 1)
        c = np.stack([(p >> np.uint8(j * bits)) & mask for j in range(per)], axis=1).reshape(-1)[:n]
    else:
        stream = np.unpackbits(p, bitorder="little")[: n * bits].reshape(n, bits)
        c = np.packbits(stream, axis=1, bitorder="little").reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(c, dtype=np.uint8)).reshape(shape)
