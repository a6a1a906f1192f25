"""Low-rank bases for gradient projection: which side a matrix is projected on, and how the
basis is computed (exact SVD, randomized range finder, or a seeded random orthonormal matrix).

Side convention, for an m x n gradient G and rank r:
  LEFT:  basis P is m x r (orthonormal columns); project(G) = P^T G (r x n); back(N) = P N.
  RIGHT: basis Q is r x n (orthonormal rows);    project(G) = G Q^T (m x r); back(N) = N Q.
The side is chosen once and stored; it is never inferred from tensor shapes."""

import torch

LEFT, RIGHT = 0, 1
PROJ_TYPES = ("std", "reverse_std", "left", "right")
METHODS = ("svd", "randomized", "random")


def choose_side(shape: tuple[int, int], proj_type: str) -> int:
    """std puts the basis on the smaller side (states on the larger), as galore-torch does."""
    rows, cols = shape
    if proj_type == "left":
        return LEFT
    if proj_type == "right":
        return RIGHT
    smaller_is_cols = rows >= cols
    if proj_type == "std":
        return RIGHT if smaller_is_cols else LEFT
    return LEFT if smaller_is_cols else RIGHT  # reverse_std


def basis_rank(shape: tuple[int, int], rank: int) -> int:
    """rank, capped at min(m, n): an SVD has no more singular vectors, whichever the side."""
    return min(rank, *shape)


def low_rank_numels(shape: tuple[int, int], side: int, rank: int) -> tuple[int, int]:
    """(elements of the projected gradient and of each moment, elements of the basis)."""
    rows, cols = shape
    if side == LEFT:
        return rank * cols, rows * rank
    return rows * rank, rank * cols


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def project(grad: torch.Tensor, basis: torch.Tensor, side: int) -> torch.Tensor:
    return basis.t() @ grad if side == LEFT else grad @ basis.t()


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: int) -> torch.Tensor:
    return basis @ low_rank if side == LEFT else low_rank @ basis


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Makes the largest-magnitude entry of each column positive, so the basis is the same on
    every rank and every run whatever sign the SVD routine picked."""
    if vectors.numel() == 0:  # a zero-size matrix has an empty basis
        return vectors
    index = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, index.unsqueeze(0)))
    signs[signs == 0] = 1
    return vectors * signs


def left_vectors(
    matrix: torch.Tensor,
    rank: int,
    method: str,
    *,
    generator: torch.Generator | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    fix_signs: bool = True,
) -> torch.Tensor:
    """An m x rank orthonormal basis of matrix's leading left singular space (float32)."""
    matrix = matrix.float()
    rows, cols = matrix.shape
    if method == "svd":
        vectors = torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]
    elif method == "randomized":
        width = min(rank + oversample, rows, cols)
        omega = torch.randn(cols, width, generator=generator, dtype=torch.float32).to(matrix.device)
        sample = torch.linalg.qr(matrix @ omega)[0]  # m x width
        for _ in range(power_iters):
            sample = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.t() @ sample)[0])[0]
        small = sample.t() @ matrix  # width x n
        vectors = sample @ torch.linalg.svd(small, full_matrices=False)[0][:, :rank]
    elif method == "random":
        gaussian = torch.randn(rows, rank, generator=generator, dtype=torch.float32).to(matrix.device)
        return torch.linalg.qr(gaussian)[0]
    else:
        raise ValueError(f"projector: expected one of {METHODS}, got {method!r}")
    return _fix_signs(vectors) if fix_signs else vectors


def compute_basis(
    grad: torch.Tensor, side: int, rank: int, method: str, *, fix_signs: bool = True, **kwargs
) -> torch.Tensor:
    """The basis for side: P (m x r) for LEFT, Q (r x n) for RIGHT. The exact SVD is taken of G
    itself for both sides (U or Vh), so with fix_signs off the signs are those galore-torch gets."""
    if method == "svd":
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        if side == LEFT:
            return _fix_signs(u[:, :rank]) if fix_signs else u[:, :rank]
        rows = vh[:rank]
        return (_fix_signs(rows.t()).t() if fix_signs else rows).contiguous()
    if side == LEFT:
        return left_vectors(grad, rank, method, fix_signs=fix_signs, **kwargs)
    return left_vectors(grad.t(), rank, method, fix_signs=fix_signs, **kwargs).t().contiguous()


def random_basis(shape: tuple[int, int], side: int, rank: int, seed: int, device) -> torch.Tensor:
    """A seeded random orthonormal basis; regenerated from the seed, so it is never stored."""
    generator = torch.Generator().manual_seed(seed)
    size = shape[0] if side == LEFT else shape[1]
    basis = left_vectors(torch.empty(size, 1), rank, "random", generator=generator).to(device)
    return basis if side == LEFT else basis.t().contiguous()
