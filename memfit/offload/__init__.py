"""Where training state rests between uses: the tiers and what moves tensors between them.

- Tiers. Where the model runs; the host tier (host_tier.py: HostArenas, pinned on a GPU
  machine); NVMe (swap_space.py: one preallocated O_DIRECT swap file per rank and purpose).
- What lives there. fp32 masters and optimizer state (offload_optimizer), the owned 16-bit
  parameters (offload_param: the host tier, or param_store.py), and, in the streamed stage-3 step,
  gradients (streamed_step.py).
- Updates. Each tier's phase 3 keeps one contract (interface.py); build.py is the one place a
  tier is chosen from the config.
"""
