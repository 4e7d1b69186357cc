"""Second-order optimizers on ``torch.optim`` built from natgrad's operators and solvers.

* :class:`HessianFree`: Martens (2010): GGN/Fisher, CG warm start, LM damping, CG-iterate
  backtracking.
* :class:`NaturalGradient`: Fisher of a declared output family or the empirical Fisher;
  fixed ``lr`` or a KL trust region ``max_kl`` (TRPO's step).
* :class:`TrustRegionNewton`: Steihaug trust-region Newton (exact Hessian or GGN).

The closure contract, shared by all three (details in :mod:`natgrad.optim._base`):
``closure()`` evaluates the loss on the current minibatch by calling the model given to the
optimizer and returns it (a scalar tensor; per-sample losses ``(B,)`` for the empirical
Fisher) **without** calling ``backward()``; the optimizer differentiates it and evaluates
trial points with it. ``step(closure, inputs)`` also takes the model inputs of the curvature
batch when the curvature comes from the model outputs (GGN, Fisher).
"""

from natgrad.optim.hessian_free import HessianFree
from natgrad.optim.natural_gradient import NaturalGradient, mean_kl
from natgrad.optim.trust_region_newton import TrustRegionNewton

__all__ = ["HessianFree", "NaturalGradient", "TrustRegionNewton", "mean_kl"]
