"""Interpretability: hook points and activation capture, sparse autoencoders (TopK, ReLU-L1,
JumpReLU) trained in JAX, their evaluation (FVU, L0, spliced-in loss), SAELens export,
dashboards and steering. Model-side sites live in `qwenjax.model.hooks`."""
