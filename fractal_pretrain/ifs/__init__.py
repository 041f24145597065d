"""IFS systems: sampling (Anderson SVD, FractalDB), FractalDB's fill rate, and system banks."""

from fractal_pretrain.ifs.bank import (
    BankError,
    BankSpec,
    SystemBank,
    build_bank,
    cached_bank,
)
from fractal_pretrain.ifs.sample import (
    MAX_MAPS,
    default_alpha_range,
    fill_rate,
    map_probabilities,
    sample_fractaldb_system,
    sample_singular_values,
    sample_svd_system,
    singular_values,
    system_rng,
)

__all__ = [
    "MAX_MAPS",
    "BankError",
    "BankSpec",
    "SystemBank",
    "build_bank",
    "cached_bank",
    "default_alpha_range",
    "fill_rate",
    "map_probabilities",
    "sample_fractaldb_system",
    "sample_singular_values",
    "sample_svd_system",
    "singular_values",
    "system_rng",
]
