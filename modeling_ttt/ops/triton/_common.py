"""Element-wise and row-wise pieces shared by the Triton kernels (all in fp32, on register tiles).

Tiles are padded to powers of two (at least 16, so `tl.dot` is legal on tensor cores): a `[BLOCK_M, BLOCK_D]`
tile holds `M` real tokens and `D` real features. Every helper takes the feature mask `d_mask` (`[BLOCK_D]`) and
keeps the padded lanes at exactly zero, so padded lanes never enter a mean, a variance or a matmul. Padded token
rows carry a zero learning rate and a zero token scale, which removes them from every sum over tokens.

The math is the one of `modeling_ttt/ops/torch_chunk.py` (`layer_norm`, `layer_norm_l2_grad`, `gelu_tanh`,
`gelu_tanh_grad`) plus the backward passes of those pieces, derived by hand (checked against autograd through
the reference by tests/test_triton.py).
"""

import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be `tl.constexpr` instances.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_TANH_ARG_LIMIT = tl.constexpr(40.0)  # tanh(±40) is ±1 in fp32; clamping keeps exp() finite (no overflow warnings)


@triton.jit
def normalize(x, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    """Row-wise LayerNorm without affine: returns `(x_hat, centered, inv_std)` (`inv_std` is `[BLOCK_M]`)."""
    x = tl.where(d_mask[None, :], x, 0.0)
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(d_mask[None, :], x - mean[:, None], 0.0)
    inv_std = tl.rsqrt(tl.sum(centered * centered, axis=1) / D + EPS)
    return centered * inv_std[:, None], centered, inv_std


@triton.jit
def layer_norm_l2_grad(z, target, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    """∂ℓ/∂z for ℓ = ½‖LN(z)·w + b − target‖² (the LayerNorm backward fused with the l2 loss)."""
    z_hat, _, inv_std = normalize(z, d_mask, D, EPS)
    grad_z_hat = ln_w[None, :] * (ln_w[None, :] * z_hat + ln_b[None, :] - target)  # zero at padded lanes
    projection = tl.sum(grad_z_hat * z_hat, axis=1) / D
    out = grad_z_hat - (tl.sum(grad_z_hat, axis=1) / D)[:, None] - z_hat * projection[:, None]
    return tl.where(d_mask[None, :], out * inv_std[:, None], 0.0)


@triton.jit
def layer_norm_l2_grad_backward(grad_out, z, target, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    """Backward of `layer_norm_l2_grad` w.r.t. `z`, `target`, `ln_w` and `ln_b`, given `grad_out` = ∂L/∂(∂ℓ/∂z).

    With ẑ = (z − μ)·r, g = w∘(w∘ẑ + b − target), m = mean(g∘ẑ), h = g − mean(g) − ẑ·m, the function is r·h.
    Returns `(grad_z, grad_target, grad_ln_w, grad_ln_b)`, the last two summed over the rows of the tile.
    """
    z_hat, centered, inv_std = normalize(z, d_mask, D, EPS)
    grad_z_hat = ln_w[None, :] * (ln_w[None, :] * z_hat + ln_b[None, :] - target)
    projection = tl.sum(grad_z_hat * z_hat, axis=1) / D
    h = grad_z_hat - (tl.sum(grad_z_hat, axis=1) / D)[:, None] - z_hat * projection[:, None]
    h = tl.where(d_mask[None, :], h, 0.0)
    grad_out = tl.where(d_mask[None, :], grad_out, 0.0)
    grad_inv_std = tl.sum(grad_out * h, axis=1)  # through the outer factor r
    grad_h = grad_out * inv_std[:, None]
    grad_projection = -tl.sum(grad_h * z_hat, axis=1)
    grad_g = grad_h - (tl.sum(grad_h, axis=1) / D)[:, None] + (grad_projection / D)[:, None] * z_hat
    grad_g = tl.where(d_mask[None, :], grad_g, 0.0)
    grad_z_hat_total = (-projection[:, None] * grad_h + (grad_projection / D)[:, None] * grad_z_hat
                        + (ln_w * ln_w)[None, :] * grad_g)
    grad_ln_w = tl.sum(grad_g * (2.0 * ln_w[None, :] * z_hat + ln_b[None, :] - target), axis=0)
    grad_ln_b = tl.sum(ln_w[None, :] * grad_g, axis=0)
    grad_target = -ln_w[None, :] * grad_g
    # ẑ = c·r with r = (mean(c²) + eps)^(-1/2): ∂r/∂c = −r³·c/D
    grad_r_total = grad_inv_std + tl.sum(grad_z_hat_total * centered, axis=1)
    grad_centered = (grad_z_hat_total * inv_std[:, None]
                     - (grad_r_total * inv_std * inv_std * inv_std / D)[:, None] * centered)
    grad_centered = tl.where(d_mask[None, :], grad_centered, 0.0)
    grad_z = grad_centered - (tl.sum(grad_centered, axis=1) / D)[:, None]
    return tl.where(d_mask[None, :], grad_z, 0.0), grad_target, grad_ln_w, grad_ln_b


@triton.jit
def layer_norm_affine(x, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    """`LN(x)·w + b`, zero at padded lanes."""
    x_hat, _, _ = normalize(x, d_mask, D, EPS)
    return tl.where(d_mask[None, :], x_hat * ln_w[None, :] + ln_b[None, :], 0.0)


@triton.jit
def layer_norm_affine_backward(grad_out, x, ln_w, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    """Backward of `layer_norm_affine`: `(grad_x, grad_ln_w, grad_ln_b)`, the last two summed over rows."""
    x_hat, _, inv_std = normalize(x, d_mask, D, EPS)
    grad_out = tl.where(d_mask[None, :], grad_out, 0.0)
    grad_x_hat = grad_out * ln_w[None, :]
    grad_x = inv_std[:, None] * (grad_x_hat - (tl.sum(grad_x_hat, axis=1) / D)[:, None]
                                 - x_hat * (tl.sum(grad_x_hat * x_hat, axis=1) / D)[:, None])
    return tl.where(d_mask[None, :], grad_x, 0.0), tl.sum(grad_out * x_hat, axis=0), tl.sum(grad_out, axis=0)


@triton.jit
def _clamped_inner(x):
    inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    return tl.minimum(tl.maximum(inner, -_TANH_ARG_LIMIT), _TANH_ARG_LIMIT)


@triton.jit
def gelu_tanh(x):
    # 0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)(x + 0.044715x³)
    inner = _clamped_inner(x)
    return x * tl.sigmoid(2.0 * inner)


@triton.jit
def gelu_tanh_grad(x):
    inner = _clamped_inner(x)
    tanh_inner = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
    inner_grad = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner * tanh_inner) * inner_grad


@triton.jit
def gelu_tanh_second_grad(x):
    """d²/dx² of the tanh GELU: (1 − t²)·(u′ − x·t·u′² + 3·√(2/π)·0.044715·x²), t = tanh(u)."""
    inner = _clamped_inner(x)
    tanh_inner = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
    inner_grad = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return (1.0 - tanh_inner * tanh_inner) * (
        inner_grad - x * tanh_inner * inner_grad * inner_grad + 3.0 * _SQRT_2_OVER_PI * _GELU_CUBIC * x * x)
