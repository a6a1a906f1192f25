"""ZeRO stages 1 and 2: whole-tensor ownership, gradient buckets, and the collectives that sync them."""
