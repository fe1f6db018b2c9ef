"""The ground floor: the canonical quantized checkpoint (integer codes + per-row fp16 step + grid), the grids,
bit packing and atomic writes. Everything above reads or writes through it; it imports nothing of ours above it."""
