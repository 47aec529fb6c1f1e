"""Reads what really reached a W&B run: the records of its offline ``.wandb`` file.

The file is W&B's LevelDB-log framing: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (CRC-32C, length, type: full, first, middle,
last); a block's last 6 bytes or fewer are padding. Each whole record is a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a W&B LevelDB-log file"
    out, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if offset + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def finished_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a run once its ``exit`` record is on disk: ``wandb.finish()`` can return before
    the offline writer has flushed the file (wandb 0.31)."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(path) if path.stat().st_size >= 7 else []
        if any(record.WhichOneof("record_type") == "exit" for record in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout:.0f} s: the run was not finished")
        time.sleep(0.1)


def history(path: Path) -> dict[str, list]:
    """Each history key of the finished run with its logged values, in order."""
    series: dict[str, list] = {}
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                series.setdefault(key, []).append(json.loads(item.value_json))
    return series
