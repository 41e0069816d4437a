"""QuantSpec: how a linear layer's weight is quantized (bits, group size, symmetry)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

ALLOWED_BITS = (2, 3, 4)
ALLOWED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output row (per-channel)


def _is_int(value) -> bool:
    """A plain integer (numpy / torch integer scalars included), not a bool or a float."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """Weight quantization settings.

    bits: 2, 3 or 4. group_size: consecutive input features that share a scale and zero point
    (32, 64, 128, or -1 for per-channel). symmetric: zero point fixed at 2**(bits-1) - 1.
    """

    bits: int = 2
    group_size: int = 64
    symmetric: bool = False

    def __post_init__(self):
        # integers only: 2.0 == 2 in Python, but a float here means a config or caller went wrong
        if not _is_int(self.bits) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; allowed: {ALLOWED_BITS} (integers)")
        if not _is_int(self.group_size) or self.group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; allowed: {ALLOWED_GROUP_SIZES} "
                "(-1 means per-channel)"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric={self.symmetric!r} must be True or False")

    @property
    def qmax(self) -> int:
        """Largest integer level, 2**bits - 1."""
        return (1 << self.bits) - 1

    def group_len(self, in_features: int) -> int:
        """Elements per group for a layer with `in_features` inputs; checks that the groups tile it."""
        if in_features <= 0:
            raise ValueError(f"in_features={in_features} must be positive")
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            fits = [g for g in ALLOWED_GROUP_SIZES if g > 0 and in_features % g == 0] + [-1]
            raise ValueError(
                f"group_size={self.group_size} does not divide in_features={in_features}; "
                f"group sizes that would: {fits}"
            )
        return self.group_size

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_len(in_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        """From a config dict; its values are taken as they are (a "bits": 2.0 is refused, not rounded)."""
        return cls(bits=d["bits"], group_size=d["group_size"], symmetric=d["symmetric"])
