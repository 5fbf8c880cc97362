# PLACEHOLDER: the logit_laplace owner replaces this file.
def logit_laplace_loss(*a, **k):
    raise NotImplementedError


def map_pixels(x, eps=0.1):
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x, eps=0.1):
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)
