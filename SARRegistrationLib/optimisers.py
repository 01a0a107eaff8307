"""Adam, written out for the per-pair stages (finetuning and instance optimisation).

Why not ``torch.optim.Adam``: its first construction in a process imports ``torch._dynamo``, which
took 0.9–1.5 s here on every command-line call and every first run in Slicer, several times the
cost of a whole 2D registration. The update below is Kingma & Ba's (2015) Algorithm 1, the same
as ``torch.optim.Adam`` with its defaults (no weight decay, no amsgrad).
"""

from __future__ import annotations

import torch


class Adam:
    """Adam over a list of leaf tensors; ``step()`` after ``backward()``, ``zero_grad()`` before it."""

    def __init__(self, parameters, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.parameters = list(parameters)
        self.lr, self.betas, self.eps = lr, betas, eps
        self._first = [torch.zeros_like(p) for p in self.parameters]
        self._second = [torch.zeros_like(p) for p in self.parameters]
        self._steps = 0

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self._steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self._steps, 1 - beta2 ** self._steps
        for parameter, first, second in zip(self.parameters, self._first, self._second):
            if parameter.grad is None:
                continue
            first.mul_(beta1).add_(parameter.grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(parameter.grad, parameter.grad, value=1 - beta2)
            # Squared gradients of ~1e-20 (flat image regions) are denormal floats, on which every
            # later operation ran 50 times slower here; a floor far below eps**2 changes no step.
            second.clamp_(min=1e-30)
            # sqrt(v) as v * rsqrt(v) (v > 0 by the floor): torch splits sqrt over threads from a
            # few thousand elements, and on a loaded 2-core machine each call then took ~10 ms.
            corrected = second / correction2
            denominator = corrected.mul_(corrected.rsqrt()).add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-self.lr / correction1)
