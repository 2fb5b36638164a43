"""Padded sizes that key a compilation: few distinct shapes, bounded waste."""


def pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest of {2^k, 3 * 2^(k-1)} >= max(n, minimum): at most 1.5x padding, two shapes per octave."""
    n = max(int(n), minimum)
    p = pow2(n)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p
