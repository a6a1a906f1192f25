"""Reads the history of a W&B offline run (wandb/offline-run-*/run-*.wandb) back, with no network
and no wandb service: the file is wandb's LevelDB-style record log (a 7-byte ":W&B" header, then
32 KiB blocks of records with a 7-byte header: CRC, length, kind) of protobuf Records."""

import struct

BLOCK_BYTES, RECORD_HEADER_BYTES = 32768, 7
FULL, LAST = 1, 4


def history(path: str) -> list[dict]:
    """One dict per logged step: {key: value parsed from JSON}, "_step" included."""
    import json

    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    position, pending, rows = RECORD_HEADER_BYTES, b"", []
    while position + RECORD_HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < RECORD_HEADER_BYTES:
            position += left_in_block  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + RECORD_HEADER_BYTES])
        if kind == 0 and length == 0:
            break
        start = position + RECORD_HEADER_BYTES
        pending += data[start : start + length]
        position = start + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows
