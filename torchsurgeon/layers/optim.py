"""``ts.optim``: optimizers as data, for ``ts.train`` (locally and on a host)."""

from torchsurgeon.layers.training import SGD, AdamW, Optimizer

__all__ = ["SGD", "AdamW", "Optimizer"]
