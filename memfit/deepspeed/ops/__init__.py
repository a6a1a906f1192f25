"""deepspeed.ops: the optimizers scripts import from it (deepspeed.ops.adam)."""

from memfit.deepspeed.ops import adam  # noqa: F401
