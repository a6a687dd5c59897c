"""Post-construction initialisers: explicit functions that change a built model in place and fail loudly when they
match no layer."""

from effml.init.mimetic import MIMETIC_PARTS, apply_mimetic_init

__all__ = ["MIMETIC_PARTS", "apply_mimetic_init"]
