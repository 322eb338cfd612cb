"""Random inputs shared by the property tests."""
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Tolerances on log-prob values per input dtype (the kernels read the same rounded inputs as the reference,
# so only accumulation order and the vectorised exp differ).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-10}


def make_logits(n, v, dtype, seed, *, ties=False, neg_inf_frac=0.0, scale=3.0):
    """[n, v] logits; ties draws from a few integer values; neg_inf_frac masks entries (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-3, 4, (n, v), generator=g).to(torch.float64)
    else:
        x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if neg_inf_frac > 0:
        mask = torch.rand(n, v, generator=g) < neg_inf_frac
        mask[torch.arange(n), torch.randint(0, v, (n,), generator=g)] = False
        x = x.masked_fill(mask, float("-inf"))
    return x.to(dtype)
