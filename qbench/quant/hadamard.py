"""Hadamard transforms for rotation methods (QuaRot), in plain torch.

A Hadamard matrix H_n (entries +-1, H H^T = n I) exists for n = 1, 2 and only multiples of 4. QuaRot
needs them for model sizes that are not powers of two (SmolLM2: hidden 576 = 36 * 2^4, intermediate
1536 = 12 * 2^7), so H_n is built as a Kronecker product
    H_n = H_b (x) S_p,      n = b * p,  p a power of two (Sylvester: S_2p = [[S_p, S_p], [S_p, -S_p]])
with a base b from one of the Paley constructions (QuaRot ships hand-made tables of sizes 12, 20, 28,
36, 40, 44, 52, 60, 108, 140, 156, 172; we construct ours instead):
    Paley I,  q prime, q = 3 mod 4: order q + 1      (12 = 11 + 1, 20, 24, 32, 44, 48, 60, ...)
    Paley II, q prime, q = 1 mod 4: order 2 (q + 1)  (12, 28 = 2 * 14, 36 = 2 * 18, 60, 76, 108, ...)
both from the quadratic character chi of GF(q) (the Jacobsthal matrix Q_ij = chi(j - i)). The smallest
base that works is taken, so most of the transform is the fast Walsh-Hadamard butterfly on p.
Where no such factorization exists (an odd n, or a base none of these constructions give, e.g. 52
needs GF(25)), `orthogonal(n)` falls back to a seeded random orthogonal matrix (QR of a Gaussian),
and the caller records that.

Everything is normalized: `transform(x) = x @ M^T` with M = H_n / sqrt(n) orthogonal.
"""

import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = chi(j - i) over the integers mod the prime q (chi: 0, +1 on squares, -1 otherwise)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    ones = torch.ones(q, dtype=torch.float64)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = ones, -ones, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + S


def paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4: C = [[0, 1^T], [1, Q]] (symmetric conference matrix),
    H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]."""
    ones = torch.ones(q, dtype=torch.float64)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = ones, ones, _jacobsthal(q)
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


def sylvester(p: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
    return H


def base_matrix(b: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of order b from Sylvester or Paley I/II, or None."""
    if b & (b - 1) == 0:
        return sylvester(b)
    if b % 4 == 0 and _is_prime(b - 1) and (b - 1) % 4 == 3:
        return paley1(b - 1)
    if b % 4 == 0 and _is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1:
        return paley2(b // 2 - 1)
    return None


def factor(n: int) -> tuple[int, int] | None:
    """(b, p) with n = b * p, p a power of two and b the smallest constructible base; None if none."""
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        if base_matrix(n // p) is not None:
            return n // p, p
        p //= 2
    return None


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) over the last dim, a power of two."""
    n = x.shape[-1]
    shape, h = x.shape, 1
    while h < n:
        x = x.reshape(-1, n // (2 * h), 2, h)
        x = torch.stack([x[:, :, 0] + x[:, :, 1], x[:, :, 0] - x[:, :, 1]], dim=2)
        h *= 2
    return x.reshape(shape)


class Hadamard:
    """The normalized Hadamard transform of size n = b * p: M = (H_b (x) S_p) / sqrt(n)."""

    def __init__(self, n: int):
        found = factor(n)
        if found is None:
            raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley; use orthogonal({n})")
        self.n, (self.b, self.p) = n, found
        self.base = base_matrix(self.b)  # float64 [b, b], +-1

    def transform(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x @ M^T over the last dim, as the Kronecker structure: reshape [.., b, p], butterfly on p,
        H_b on b. `base` is the caller's copy of self.base on x's device and dtype (else made here)."""
        base = self.base.to(x.device, x.dtype) if base is None else base
        X = _fwht(x.reshape(*x.shape[:-1], self.b, self.p))
        if self.b > 1:
            X = torch.matmul(base, X)
        return X.reshape(x.shape) / math.sqrt(self.n)

    def matrix(self) -> torch.Tensor:
        """The explicit float64 [n, n] matrix M (the reference the fast transform is checked against)."""
        return torch.kron(self.base, sylvester(self.p)) / math.sqrt(self.n)

    def describe(self) -> str:
        kind = "Sylvester" if self.b == 1 else f"H_{self.b} (Paley) x Sylvester {self.p}"
        return f"Hadamard {self.n} = {kind}"


def orthogonal(n: int, generator: torch.Generator, mode: str = "hadamard") -> tuple[torch.Tensor, str]:
    """A float64 [n, n] orthogonal matrix and what it is. mode "hadamard": the Hadamard M with random
    signs, diag(s) M (s +-1 from the generator; QuaRot's random Hadamard), or, where no Hadamard of
    order n is constructed here, a random orthogonal matrix; mode "random": a random orthogonal matrix
    (QR of a Gaussian, signs fixed by diag R, as QuaRot's rotate_mode random)."""
    if mode == "hadamard" and factor(n) is not None:
        had = Hadamard(n)
        signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
        return signs[:, None] * had.matrix(), f"random {had.describe()} (random signs)"
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(A)
    why = "rotate_mode=random" if mode == "random" else "no Hadamard of this order"
    return q * torch.sign(torch.diag(r))[None, :], f"random orthogonal {n} (QR; {why})"
