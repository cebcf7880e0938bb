"""CKKS parameters: chosen from the plan's depth and validated against the 128-bit HE standard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from medhe.errors import ConfigError, InsecureParametersError

# Largest total coefficient modulus (bits, special prime included) for 128-bit classical security
# with a ternary secret: HomomorphicEncryption.org standard, table 1 (also SEAL's CoeffModulus.MaxBitCount).
MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60


@dataclass(frozen=True)
class CKKSParams:
    """poly_modulus_degree N, prime sizes (first = result prime, last = special key-switching
    prime, in between one prime per level), and the encoding scale."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    log_scale_bits: int
    insecure_for_tests: bool = False
    # Scale of fresh ciphertexts (0: the base scale). A larger one keeps the key-switching noise of
    # the first rotations small relative to the values; the first prime is sized to match.
    log_input_scale_bits: int = 0

    @property
    def input_scale_bits(self) -> int:
        return self.log_input_scale_bits or self.log_scale_bits

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_LOG_Q_128:
            raise ConfigError(f"poly_modulus_degree must be one of {sorted(MAX_LOG_Q_128)}, got {n}")
        if len(self.coeff_modulus_bits) < 3:
            raise ConfigError("coeff_modulus_bits needs a result prime, at least one level and a special prime")
        if any(b < 20 or b > MAX_PRIME_BITS for b in self.coeff_modulus_bits):
            raise ConfigError(f"every prime must have 20..{MAX_PRIME_BITS} bits, got {self.coeff_modulus_bits}")
        if not self.insecure_for_tests and self.total_bits > MAX_LOG_Q_128[n]:
            raise InsecureParametersError(
                f"N={n} with a {self.total_bits}-bit modulus is below 128-bit security "
                f"(at most {MAX_LOG_Q_128[n]} bits); use a larger N or fewer levels, or pass "
                "insecure_for_tests=True in tests only"
            )

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_modulus_bits)

    @property
    def levels(self) -> int:
        """Multiplicative levels available (rescales before only the result prime is left)."""
        return len(self.coeff_modulus_bits) - 2

    @property
    def security_bits(self) -> int:
        return 128 if self.total_bits <= MAX_LOG_Q_128[self.poly_modulus_degree] else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coeff_modulus_bits"] = list(self.coeff_modulus_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        try:
            return cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_modulus_bits=tuple(int(b) for b in d["coeff_modulus_bits"]),
                log_scale_bits=int(d["log_scale_bits"]),
                insecure_for_tests=bool(d.get("insecure_for_tests", False)),
                log_input_scale_bits=int(d.get("log_input_scale_bits", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid CKKS parameters {d!r}: {exc}") from exc

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def choose_params(
    rescales: int | list[int],
    min_slots: int,
    *,
    log_scale_bits: int | None = None,
    integer_bits: int = 16,
    poly_modulus_degree: int | None = None,
    insecure_for_tests: bool = False,
    input_extra_bits: int = 0,
    first_weight_extra_bits: int = 0,
) -> CKKSParams:
    """Smallest N whose 128-bit modulus budget holds the plan's rescales and `min_slots` slots.

    `rescales` lists, for each rescale in execution order, the ciphertext's scale just before it
    in units of the base scale: 1 after a plaintext multiply of a fresh ciphertext, 2 when a
    square came before the multiply (square + linear layer share one prime: the prime is twice
    the scale, so 7 multiplications fit in 4 primes). An int n means n rescales of factor 1.
    The result prime gets `integer_bits` more than the scale, so decrypted values up to
    2**integer_bits keep full precision; the special prime is at least the largest data prime.
    Without an explicit scale, the largest one that fits (at most 40 bits) is used. With
    `input_extra_bits`, fresh ciphertexts are encrypted that many bits above the base scale (the
    first prime grows to match), which keeps rotation noise on the input small. With
    `first_weight_extra_bits`, the first rescale's prime grows by that much more (at most 60
    bits): the first layer's weights are then encoded that many bits above the base scale, where
    the noise of an encrypted weight (encrypted-model mode) is relatively that much smaller.
    """
    factors = [1] * rescales if isinstance(rescales, int) else [int(f) for f in rescales]
    if not factors or min(factors) < 1:
        raise ConfigError(f"need at least one rescale with positive factors, got {rescales}")
    depth = len(factors)
    candidates = [poly_modulus_degree] if poly_modulus_degree else sorted(MAX_LOG_Q_128)
    reasons = []

    def input_bits(scale: int) -> int:
        return min(MAX_PRIME_BITS, scale + input_extra_bits) if factors[0] == 1 else scale

    def chain(scale: int) -> tuple[int, ...]:
        primes = [f * scale for f in factors]
        primes[0] = primes[0] - scale + input_bits(scale)
        if factors[0] == 1:
            primes[0] = min(MAX_PRIME_BITS, primes[0] + first_weight_extra_bits)
        result = min(MAX_PRIME_BITS, scale + integer_bits)
        special = max(primes + [result])
        # SEAL drops primes from the end of the data list first: the first rescale's prime is last.
        return (result,) + tuple(reversed(primes)) + (special,)

    for n in candidates:
        if n // 2 < min_slots:
            reasons.append(f"N={n}: {n // 2} slots < {min_slots} needed")
            continue
        budget = MAX_LOG_Q_128[n]
        largest = min(40, MAX_PRIME_BITS // max(factors))
        if log_scale_bits:
            scale = log_scale_bits
        elif insecure_for_tests:
            scale = min(largest, 30)  # small test rings: keep precision, security is waived
        else:
            scale = next((s for s in range(largest, 0, -1) if sum(chain(s)) <= budget), 0)
        if scale < 24:
            reasons.append(f"N={n}: {depth} levels leave only a {scale}-bit scale")
            continue
        bits = chain(scale)
        if max(bits) > MAX_PRIME_BITS:
            reasons.append(f"N={n}: a {scale}-bit scale needs {max(bits)}-bit primes (at most {MAX_PRIME_BITS})")
            continue
        if sum(bits) > budget and not insecure_for_tests:
            reasons.append(f"N={n}: needs {sum(bits)} bits, 128-bit security allows {budget}")
            continue
        extra = input_bits(scale)
        return CKKSParams(n, bits, scale, insecure_for_tests=insecure_for_tests,
                          log_input_scale_bits=extra if extra != scale else 0)
    raise InsecureParametersError(
        f"no parameters fit {depth} levels at 128-bit security: " + "; ".join(reasons)
        + ". Use a shallower model (fewer activations) or pass insecure_for_tests=True in tests only"
    )
