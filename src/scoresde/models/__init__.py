"""Model families (imaging tutorial, DESIGN section 12), each in its own module, and alignment.

Importing this package registers every family's builder in `MODELS` and its losses in `learning.losses.LOSSES`.
"""
from . import ddpm, ncsn, score, vae  # noqa: F401  (each registers its family)
from .family import MODELS, unwrap

__all__ = ["MODELS", "unwrap"]
