"""AVMoE adapters (CMA, UA, noisy router) and MoLT token fusion: lands with issue 4."""
