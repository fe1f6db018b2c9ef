"""Bit-packing of integer codes: each row an LSB-first bit stream, padded to whole bytes.

Rows are packed independently so a row slice of the packed tensor is a row of codes (exporters read per row).
One vectorised path serves every width (1, 2, 3, 4, 8 bits): unpackbits -> keep the low `bits` -> packbits.
"""

from __future__ import annotations

import numpy as np


def packed_row_bytes(columns: int, bits: int) -> int:
    return (columns * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] (< 2**bits) -> uint8 [rows, ceil(cols * bits / 8)]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if bits == 8:
        return codes.copy()
    rows, cols = codes.shape
    # [rows, cols, 8] little-endian bits of each code, keep the low `bits`
    bitplanes = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = bitplanes.reshape(rows, cols * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [rows, nbytes] -> uint8 codes [rows, cols]."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[:, :cols].copy()
    rows = packed.shape[0]
    if packed.shape[1] != packed_row_bytes(cols, bits):
        raise ValueError(f"packed row has {packed.shape[1]} bytes, expected {packed_row_bytes(cols, bits)}")
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[:, : cols * bits]
    bitplanes = stream.reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (bitplanes * weights).sum(axis=-1, dtype=np.uint8)
