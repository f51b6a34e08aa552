"""RMSNorm with the residual add fused (torch reference backend)."""
import torch


def rms_norm(x, weight, eps: float, residual=None):
    """Returns (normed, residual): with `residual`, x + residual is normed and becomes the new residual;
    without, x itself is. The norm runs in float32 and is rounded before the weight, as in transformers."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x
