"""distiller: distill a large teacher LLM into a small, fast MLX student, and prove it with pytest.

Importing this package first puts an optimized BLAS under MLX on Linux (see ``distiller.blas``);
that is why nothing here may import ``mlx`` before the call below.
"""

from distiller.blas import ensure_optimized_blas

ensure_optimized_blas()

__version__ = "0.1.0"
