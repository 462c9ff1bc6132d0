"""The widths a Hadamard transform is built for here (torch-free: the recipe preflight checks them)."""

from ..errors import SpecError


def hadamard_factors(n: int) -> tuple[int, int]:
    """(dense factor 1 or 12, power of two) with n = factor * power; a one-line error for sizes no
    Hadamard is built for here (also the recipe preflight's check)."""
    for factor in (1, 12):
        m = n // factor
        if n % factor == 0 and m >= 1 and m & (m - 1) == 0:
            return factor, m
    raise SpecError("rotation", f"a Hadamard transform of size {n} is not built here (sizes 2^k and 12*2^k are); "
                                "use rotation: none for this model")
