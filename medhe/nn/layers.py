"""HE-friendly layers for training. Nothing here is encrypted; the compiler reads the weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def relu_quadratic_fit(std: float = 1.0) -> tuple[float, float, float]:
    """Least-squares a*x^2 + b*x + c to ReLU under x ~ N(0, std^2).

    Batch norm keeps pre-activations close to N(0, 1), so that is where the polynomial must be
    accurate; fitting under the Gaussian weight puts the error where the data actually is.
    """
    # Gauss-Hermite quadrature approximates the Gaussian-weighted L2 norm; ReLU's kink at 0 keeps
    # it from being exact (a, c within ~1e-3 of the closed form 1/(2*sqrt(2*pi))), which is
    # harmless: the coefficients are only a starting point for training.
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    x = nodes * std
    y = np.maximum(x, 0.0)
    design = np.stack([x**2, x, np.ones_like(x)], axis=1) * np.sqrt(weights)[:, None]
    coef, *_ = np.linalg.lstsq(design, y * np.sqrt(weights), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


class PolyAct(nn.Module):
    """Degree-2 polynomial activation a*x^2 + b*x + c in place of ReLU.

    Coefficients start at the ReLU fit over the BN-normalised range and are then trained with the
    network: training lets each layer pick the curvature that suits it, and the fit start keeps
    the first epochs as stable as a ReLU network. Encrypted, it costs one square (one level)
    after the compiler absorbs a, b and c into the neighbouring linear layers.
    """

    # The curvature a is kept at or above this during training (medhe.train.loop projects it after
    # every step). Encrypted, the compiler completes the square, a*(x + b/2a)^2 + c - b^2/4a: as a
    # goes to 0 the shift b/2a grows without bound and the square's constant part swamps its
    # signal (a=-1e-4 in one trained model: the encrypted logits came out unrelated). So training
    # keeps a >= max(MIN_CURVATURE, |b| / (2 * MAX_SQUARE_SHIFT)): positive (convex, like the ReLU
    # it replaces) and never past the compiler's bound on the shift.
    MIN_CURVATURE = 0.05
    MAX_SQUARE_SHIFT = 16.0  # = medhe.compiler.passes.MAX_SQUARE_SHIFT

    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        a, b, c = relu_quadratic_fit()
        coef = torch.tensor([a, b, c], dtype=torch.float32)
        if trainable:
            self.coef = nn.Parameter(coef)
        else:
            self.register_buffer("coef", coef)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.coef[0], self.coef[1], self.coef[2]
        return a * x * x + b * x + c


def project_curvature(model: nn.Module) -> None:
    """Raise every PolyAct's a to its floor (a projected gradient step): at least MIN_CURVATURE and
    at least |b| / (2 * MAX_SQUARE_SHIFT), so the compiler's completed square stays within bounds."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PolyAct) and isinstance(module.coef, nn.Parameter):
                floor = max(PolyAct.MIN_CURVATURE, abs(float(module.coef[1])) / (2 * PolyAct.MAX_SQUARE_SHIFT))
                module.coef[0].clamp_(min=floor)
