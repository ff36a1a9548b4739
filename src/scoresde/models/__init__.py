"""Model families (imaging tutorial, DESIGN section 12), each in its own module, and alignment.

Importing this package registers every family's `Family` record in `FAMILIES` and its losses in
`learning.losses.LOSSES`. SMLD/NCSN (`ncsn`) is a loss of the "score" family, not a family.
"""
from . import ddpm, ncsn, score, vae  # noqa: F401  (each registers its family or loss)
from .family import EVALUATIONS, FAMILIES, Family, unwrap

__all__ = ["FAMILIES", "Family", "EVALUATIONS", "unwrap"]
