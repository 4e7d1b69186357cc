"""Tests for natgrad.linop.LinearOperator against dense float64 references and scipy."""

import doctest

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import natgrad.linop
from natgrad.linop import LinearOperator

DT = torch.float64


def spd(n, seed=0, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    eig = torch.logspace(0, np.log10(cond), n, dtype=DT)
    return (Q * eig) @ Q.T


def counting(A):
    """A matvec-only operator (no matmat) that counts its calls."""
    calls = []

    def mv(v):
        calls.append(v.shape)
        return A @ v

    return LinearOperator(mv, tuple(A.shape), A.dtype, A.device), calls


def test_from_matrix_round_trip_and_apply():
    A = torch.randn(5, 3, dtype=DT)
    op = LinearOperator.from_matrix(A)
    assert op.shape == (5, 3) and op.dtype == DT and op.device == torch.device("cpu")
    assert torch.equal(op.to_dense(), A)
    assert torch.equal(op.to_dense(chunk_size=1), A)
    v = torch.randn(3, dtype=DT)
    V = torch.randn(3, 4, dtype=DT)
    assert torch.allclose(op @ v, A @ v, rtol=1e-14, atol=0)
    assert torch.allclose(op.matvec(V), A @ V, rtol=1e-14, atol=0)
    assert torch.allclose(op(v), A @ v, rtol=1e-14, atol=0)


def test_block_via_vmap_equals_columnwise_matvecs():
    A = spd(6)
    op, calls = counting(A)
    V = torch.randn(6, 4, dtype=DT)
    out = op @ V
    assert out.shape == (6, 4)
    cols = torch.stack([op @ V[:, j] for j in range(4)], dim=1)
    assert torch.allclose(out, cols, rtol=1e-14, atol=1e-14)
    assert torch.allclose(out, A @ V, rtol=1e-13, atol=1e-13)
    # vmap traces the matvec once for the whole block.
    assert len(calls) == 1 + 4


def test_block_falls_back_to_a_loop_when_matvec_cannot_be_vmapped():
    A = spd(5)

    def mv(v):
        scale = float(v.abs().max().item()) or 1.0  # .item(): not vmappable
        return (A @ (v / scale)) * scale

    op = LinearOperator(mv, (5, 5), DT, "cpu")
    V = torch.randn(5, 3, dtype=DT)
    assert torch.allclose(op @ V, A @ V, rtol=1e-13, atol=1e-13)
    assert torch.allclose(op @ V, A @ V, rtol=1e-13, atol=1e-13)  # cached fallback path
    assert (op @ V[:, :0]).shape == (5, 0)


def test_matmat_is_used_for_blocks():
    A = spd(4)
    used = []
    op = LinearOperator(A.mv, (4, 4), DT, "cpu", matmat=lambda V: used.append(1) or A @ V)
    V = torch.randn(4, 2, dtype=DT)
    assert torch.allclose(op @ V, A @ V)
    assert used == [1]


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(5, dtype=DT),  # wrong length
        torch.zeros(4, dtype=torch.float32),  # wrong dtype
        torch.zeros(4, 2, 2, dtype=DT),  # wrong ndim
        torch.zeros((), dtype=DT),
        torch.zeros(3, 2, dtype=DT),  # wrong block rows
    ],
)
def test_matvec_rejects_bad_v(bad):
    op = LinearOperator.from_matrix(spd(4))
    with pytest.raises(ValueError, match="v must be"):
        op @ bad


def test_matvec_rejects_non_tensor():
    op = LinearOperator.from_matrix(spd(4))
    with pytest.raises(ValueError, match="v must be"):
        op.matvec(np.zeros(4))


def test_constructor_validation():
    with pytest.raises(ValueError, match="matvec"):
        LinearOperator(None, (2, 2), DT, "cpu")
    with pytest.raises(ValueError, match="shape"):
        LinearOperator(lambda v: v, (2,), DT, "cpu")
    with pytest.raises(ValueError, match="shape"):
        LinearOperator(lambda v: v, (2, -1), DT, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        LinearOperator(lambda v: v, (2, 2), "float64", "cpu")
    with pytest.raises(ValueError, match="matmat"):
        LinearOperator(lambda v: v, (2, 2), DT, "cpu", matmat=3)
    with pytest.raises(ValueError, match="A must be"):
        LinearOperator.from_matrix(torch.zeros(3, dtype=DT))


def test_damped_adds_lambda_identity_and_leaves_original():
    A = spd(5)
    op = LinearOperator.from_matrix(A)
    d = op.damped(0.5)
    assert torch.allclose(d.to_dense(), A + 0.5 * torch.eye(5, dtype=DT), rtol=1e-14, atol=1e-14)
    assert torch.equal(op.to_dense(), A)
    assert op.damped(0.0) is op
    assert torch.allclose(op.damped(torch.tensor(2.0)).to_dense(), A + 2 * torch.eye(5, dtype=DT))
    # damped of a matvec-only operator also handles blocks (vmap path).
    mv_only, _ = counting(A)
    V = torch.randn(5, 3, dtype=DT)
    assert torch.allclose(mv_only.damped(0.25) @ V, A @ V + 0.25 * V, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("lam", [-1e-3, float("nan"), float("inf"), "0.1"])
def test_damped_rejects_bad_lambda(lam):
    op = LinearOperator.from_matrix(spd(3))
    with pytest.raises(ValueError, match="lam"):
        op.damped(lam)


def test_damped_needs_square():
    with pytest.raises(ValueError, match="square"):
        LinearOperator.from_matrix(torch.zeros(2, 3, dtype=DT)).damped(1.0)


def test_sum_and_scalar_multiple():
    A, B = spd(4, 1), spd(4, 2)
    a, b = LinearOperator.from_matrix(A), LinearOperator.from_matrix(B)
    I = LinearOperator.identity(4, DT)
    assert torch.allclose((a + 0.3 * I).to_dense(), A + 0.3 * torch.eye(4, dtype=DT))
    assert torch.allclose((a + b * 2.0).to_dense(), A + 2 * B)
    with pytest.raises(ValueError, match="other"):
        a + LinearOperator.identity(3, DT)


def test_to_dense_keeps_dtype():
    A = spd(3).float()
    dense = LinearOperator.from_matrix(A).to_dense()
    assert dense.dtype == torch.float32 and torch.equal(dense, A)
    assert LinearOperator.from_matrix(spd(3)).to_dense().dtype == DT


def test_to_scipy_cg_and_eigsh():
    n = 30
    A = spd(n, seed=3, cond=50.0)
    op, _ = counting(A)
    sop = op.to_scipy()
    assert sop.shape == (n, n) and sop.dtype == np.float64
    b = np.random.default_rng(0).standard_normal(n)
    x, info = spla.cg(sop, b, rtol=1e-12, atol=0.0, maxiter=500)
    assert info == 0
    x_ref = torch.linalg.solve(A, torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(x, x_ref, rtol=1e-9, atol=1e-10)
    vals = spla.eigsh(sop, k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), torch.linalg.eigvalsh(A)[-3:].numpy(), rtol=1e-10)
    # Blocks and (n, 1) inputs, as scipy passes them.
    X = np.random.default_rng(1).standard_normal((n, 2))
    np.testing.assert_allclose(sop @ X, (A @ torch.from_numpy(X)).numpy(), rtol=1e-12)
    assert (sop.matvec(X[:, :1])).shape == (n, 1)


def test_to_scipy_from_float32_operator_returns_float64():
    A = spd(4).float()
    out = LinearOperator.from_matrix(A).to_scipy().matvec(np.ones(4))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, A.double().sum(1).numpy(), rtol=0, atol=1e-5)


def test_docstring_examples():
    assert doctest.testmod(natgrad.linop).failed == 0


# ------------------------------------------------------------------ operator algebra
def rect(m, n, seed=0, dtype=DT):
    return torch.randn(m, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_composition_transpose_and_to_dense_of_compositions():
    A, B, C = rect(4, 3, 0), rect(3, 5, 1), rect(5, 5, 2)
    a, b, c = (LinearOperator.from_matrix(M) for M in (A, B, C))
    ab = a @ b
    assert ab.shape == (4, 5)
    torch.testing.assert_close(ab.to_dense(), A @ B, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ab.T.to_dense(), (A @ B).T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close((a @ b @ c).to_dense(), A @ B @ C, rtol=1e-13, atol=1e-13)
    expr = 2.0 * (b @ c).T @ a.T - (c.T @ b.T @ a.T) / 4 + -(b.T @ a.T)
    ref = 2.0 * (B @ C).T @ A.T - (C.T @ B.T @ A.T) / 4 - B.T @ A.T
    torch.testing.assert_close(expr.to_dense(), ref, rtol=1e-12, atol=1e-12)
    v, U = rect(5, 1, 3)[:, 0], rect(2, 4, 4)
    torch.testing.assert_close(ab @ v, A @ (B @ v), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(U @ ab, U @ A @ B, rtol=1e-13, atol=1e-13)  # rows from the left
    with pytest.raises(ValueError, match="inner sizes"):
        a @ a
    with pytest.raises(ValueError, match="must be"):
        a @ LinearOperator.from_matrix(B.float())


def test_adjoint_without_rmatvec_by_autodiff_real_and_complex():
    # A matvec-only operator still has an exact adjoint/transpose (autodiff of matvec).
    for dtype in (DT, torch.complex128):
        A = rect(4, 3, 5, dtype)
        op = LinearOperator(A.__matmul__, (4, 3), dtype, "cpu")
        torch.testing.assert_close(op.H.to_dense(), A.mH, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(op.T.to_dense(), A.T, rtol=1e-13, atol=1e-13)
        assert op.H.H is op
    frozen = LinearOperator(lambda v: (A.real @ v).detach(), (4, 3), DT, "cpu")
    with pytest.raises(TypeError, match="rmatvec"):
        frozen.T @ torch.ones(4, dtype=DT)


def test_complex_hermitian_and_scalars():
    M = rect(3, 3, 6, torch.complex128)
    Hm = M + M.mH
    h = LinearOperator(Hm.mv, (3, 3), torch.complex128, "cpu", hermitian=True)
    assert h.H is h and (2.0 * h).H is not None
    torch.testing.assert_close(h.T.to_dense(), Hm.T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(((1 + 2j) * h).to_dense(), (1 + 2j) * Hm, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(((1 + 2j) * h).H.to_dense(), (1 - 2j) * Hm, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="real"):
        (1j) * LinearOperator.from_matrix(spd(3))
    with pytest.raises(ValueError, match="finite"):
        float("nan") * h
    with pytest.raises(ValueError, match="non-zero"):
        h / 0


def test_sum_of_operators_and_subtraction():
    mats = [spd(4, s) for s in range(3)]
    ops = [LinearOperator.from_matrix(M) for M in mats]
    torch.testing.assert_close(sum(ops).to_dense(), sum(mats), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close((ops[0] - ops[1]).to_dense(), mats[0] - mats[1])
    assert (ops[0] + ops[1]).H.shape == (4, 4)
    sym = LinearOperator.from_matrix(mats[0])
    sym_sum = LinearOperator(
        mats[0].mv, (4, 4), DT, "cpu", hermitian=True
    ) + LinearOperator.identity(4, DT)
    assert sym_sum.H is sym_sum and sym.H is not sym


def test_from_scipy_matrices_and_operators():
    import scipy.sparse as sp

    A = np.random.default_rng(0).standard_normal((5, 4))
    S = sp.random(5, 4, density=0.5, random_state=0, format="csr")
    Z = A + 1j * np.random.default_rng(1).standard_normal((5, 4))
    for src, ref in [(A, A), (S, S.toarray()), (spla.aslinearoperator(S), S.toarray()), (Z, Z)]:
        op = LinearOperator.from_scipy(src)
        assert op.shape == (5, 4)
        np.testing.assert_allclose(op.to_dense().numpy(), ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(op.H.to_dense().numpy(), ref.conj().T, rtol=1e-13, atol=1e-13)
    assert LinearOperator.from_scipy(Z).dtype == torch.complex128
    assert LinearOperator.from_scipy(A, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="complex"):
        LinearOperator.from_scipy(Z, dtype=DT)
    with pytest.raises(ValueError, match="2-D"):
        LinearOperator.from_scipy(np.ones(3))


def test_to_scipy_keeps_complex_values_and_has_rmatvec():
    Z = rect(4, 4, 8, torch.complex128)
    sop = LinearOperator.from_matrix(Z).to_scipy()
    assert sop.dtype == np.complex128
    x = np.arange(4) + 1j
    np.testing.assert_allclose(sop.matvec(x), Z.numpy() @ x, rtol=1e-13)
    np.testing.assert_allclose(sop.rmatvec(x), Z.numpy().conj().T @ x, rtol=1e-13)


def test_block_with_a_vector_only_callable():
    # torch.dot only accepts vectors: a block (n, k) is applied column by column.
    A = spd(4)
    op = LinearOperator(lambda v: torch.stack([torch.dot(r, v) for r in A]), (4, 4), DT, "cpu")
    V = rect(4, 3, 9)
    torch.testing.assert_close(op @ V, A @ V, rtol=1e-13, atol=1e-13)
