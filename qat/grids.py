"""The ParetoQ grids, re-exported for the QAT code: they are defined once on the ground floor,
paretoq_export.canonical.grids, where the checkpoint and every exporter read them."""

from paretoq_export.canonical.grids import (  # noqa: F401 - re-exported
    BINARY, EMBEDDING_BITS, GRIDS, LSQ3, LSQ4, LSQ8, SEQ2, TERNARY, WEIGHT_BITS, Grid, format_bits, grid_for_bits,
    parse_bits,
)
