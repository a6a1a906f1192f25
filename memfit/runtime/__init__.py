"""The training engine, ZeRO sharding, precision and schedules."""
