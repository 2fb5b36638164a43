"""Padded sizes that key a compilation: few distinct shapes, bounded waste."""

# Inference pads one request, not a batch of many: finer steps waste less compute per call (a 4160-token prompt
# pads to 5120, not 6144) for a few more compiled shapes.
SERVE_PER_OCTAVE = 4


def pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(n: int, minimum: int = 16, per_octave: int = 2) -> int:
    """Smallest size >= max(n, minimum) of the form 2^k (1 + i / per_octave), i < per_octave: at most
    (1 + 1 / per_octave)x padding (per_octave 2: {2^k, 3 * 2^(k-1)}, at most 1.5x). Octaves too small to split
    into integer steps give powers of two."""
    n = max(int(n), minimum)
    p = pow2(n)
    half = p // 2
    if half < per_octave or half % per_octave:
        return p
    step = half // per_octave
    return half + step * -(-(n - half) // step)


def serve_bucket(n: int, minimum: int = 16) -> int:
    """``bucket`` at :data:`SERVE_PER_OCTAVE` steps per octave: sequence and patch lengths of inference calls."""
    return bucket(n, minimum, SERVE_PER_OCTAVE)
