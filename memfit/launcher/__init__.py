"""The `memfit` command line: run (over torch.distributed.run), config check/schema, bench."""
