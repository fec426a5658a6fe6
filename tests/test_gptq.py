import pytest
import torch

from planner.levels.gptq import HessianNotPositiveDefinite, gptq_quantize, proxy_error
from planner.levels.quant import QuantSpec, dequantize_codes, grid_params, rtn_quantize


def correlated_inputs(n: int, d: int, seed: int = 0, outliers: float = 5.0) -> torch.Tensor:
    """X = Z A with a random mixing A, plus a few large-magnitude outlier channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    X[:, torch.randperm(d, generator=g)[:3]] *= outliers
    return X


def problem(
    out: int, d: int, seed: int = 0, n: int = 1024, outliers: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    X = correlated_inputs(n, d, seed, outliers)
    W = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 1)) * 0.02
    return W, 2 * X.T @ X / n, X


def reference_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01) -> torch.Tensor:
    """Unblocked float64 GPTQ, written from the paper: codes [out, in]."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    gw = W.shape[1] if spec.group_size <= 0 else spec.group_size
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        if i % gw == 0:  # grid of the fully updated group
            scale, zero = (t.double() for t in grid_params(W[:, i : i + gw], spec))
        q = torch.clamp(torch.round(W[:, i : i + 1] / scale) + zero, 0, 2**spec.bits - 1)
        err = (W[:, i : i + 1] - scale * (q - zero)) / Hinv[i, i]
        W[:, i:] -= err @ Hinv[i : i + 1, i:]
        Q[:, i] = q[:, 0]
    return Q


@pytest.mark.parametrize("d,group_size", [(128, 32), (96, 64), (96, -1)])
def test_beats_rtn_on_proxy_error(d, group_size):
    W, H, _ = problem(48, d)
    specs = [QuantSpec(b, group_size) for b in (2, 3, 4)]
    results = gptq_quantize(W, H, specs)
    assert [r.spec for r in results] == specs
    errors = []
    for spec, qw in zip(specs, results, strict=True):
        assert qw.shape == tuple(W.shape)
        gptq_err = proxy_error(W, qw.dequantize(), H)
        rtn_err = proxy_error(W, rtn_quantize(W, spec).dequantize(), H)
        assert gptq_err < 0.9 * rtn_err, (spec, gptq_err, rtn_err)
        errors.append(gptq_err)
    assert errors[0] > errors[1] > errors[2]


def test_strong_outliers_quantized_first_win_big():
    # x20 outlier channels late in natural order can make 2-bit GPTQ lose to RTN (no act-order);
    # ordered first (what act-order would do), GPTQ compensates through them and wins big
    W, H, _ = problem(48, 96, outliers=20.0)
    order = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    for qw in gptq_quantize(W, H, [QuantSpec(b, 32) for b in (2, 3, 4)]):
        assert proxy_error(W, qw.dequantize(), H) < 0.5 * proxy_error(W, rtn_quantize(W, qw.spec).dequantize(), H)


def test_one_call_equals_separate_calls_and_is_deterministic():
    W, H, _ = problem(32, 96)
    specs = [QuantSpec(2, 64), QuantSpec(3, 32), QuantSpec(4, 64, symmetric=True)]
    together = gptq_quantize(W, H, specs)
    again = gptq_quantize(W, H, specs)
    for spec, a, b in zip(specs, together, again, strict=True):
        (c,) = gptq_quantize(W, H, [spec])
        for x in (b, c):
            assert torch.equal(a.codes, x.codes) and torch.equal(a.scales, x.scales) and torch.equal(a.zeros, x.zeros)


@pytest.mark.parametrize("block_size", [1, 24, 128])
@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(2, 64), QuantSpec(4, -1)], ids=str)
def test_matches_unblocked_float64_reference(spec, block_size):
    # block 24 puts group starts mid-block and groups across block ends
    W, H, _ = problem(32, 96, seed=3)
    (qw,) = gptq_quantize(W, H, [spec], block_size=block_size)
    Q = reference_gptq(W, H, spec)
    assert (qw.codes_unpacked().double() == Q).double().mean() >= 0.99
    assert qw.dequantize().isfinite().all()


def test_dead_columns_are_zeroed():
    W, _, X = problem(32, 96, seed=5)
    dead = [5, 40, 95]
    X[:, dead] = 0
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec(3, 32)
    (qw,) = gptq_quantize(W, H, [spec])
    W_hat = qw.dequantize()
    assert torch.isfinite(W_hat).all()
    assert (W_hat[:, dead] == 0).all()
    assert proxy_error(W, W_hat, H) < proxy_error(W, rtn_quantize(W, spec).dequantize(), H)


def test_weight_on_the_grid_is_reproduced_exactly():
    W, H, _ = problem(16, 96, seed=7)
    spec = QuantSpec(4, 32)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, W.shape, generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the grid
    scale = (torch.rand(16, 3, generator=g) * 0.01 + 1e-3).half().float().repeat_interleave(32, 1)
    zero = torch.randint(0, 16, (16, 3), generator=g).float().repeat_interleave(32, 1)
    W = dequantize_codes(codes, scale, zero)
    (qw,) = gptq_quantize(W, H, [spec])
    assert torch.equal(qw.dequantize(), W)


def test_rank_deficient_hessian_is_damped_and_bad_hessians_raise():
    W, H, X = problem(8, 64, n=16)  # 16 samples: H has rank 16 < 64
    (qw,) = gptq_quantize(W, H, [QuantSpec(3, 32)])
    assert torch.isfinite(qw.dequantize()).all()
    with pytest.raises(HessianNotPositiveDefinite):
        gptq_quantize(W, -torch.eye(64), [QuantSpec(3, 32)])
    with pytest.raises(HessianNotPositiveDefinite):
        gptq_quantize(W, torch.full((64, 64), float("nan")), [QuantSpec(3, 32)])
    with pytest.raises(ValueError):
        gptq_quantize(W, torch.eye(32), [QuantSpec(3, 32)])


def test_proxy_error_is_the_output_error():
    W, H, X = problem(8, 32, n=64)
    W_hat = rtn_quantize(W, QuantSpec(2, 16)).dequantize()
    out_err = 2 * ((X.double() @ (W - W_hat).double().T) ** 2).sum() / X.shape[0]
    assert proxy_error(W, W_hat, H) == pytest.approx(float(out_err), rel=1e-5)
    assert proxy_error(W, W, H) == 0
