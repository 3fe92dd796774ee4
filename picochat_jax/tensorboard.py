"""TensorBoard event files without TensorFlow: scalar summaries written as the TFRecord of `Event` protos that
TensorBoard reads (`tensorboard --logdir RUN`).

A record is `length (uint64 LE) | masked crc32c(length) | data | masked crc32c(data)`; an `Event` carries
`wall_time` (field 1, double), `step` (2, int64), `file_version` (3, string) or `summary` (5) with repeated
`value` (1) of `tag` (1, string) and `simple_value` (2, float). The few protobuf bytes are encoded here by hand.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import IO


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int = 0, *, file_version: str | None = None,
                scalars: dict[str, float] | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _bytes_field(5, values)
    return out


def record_bytes(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


class EventWriter:
    """Appends scalar events to one new `events.out.tfevents.*` file in `folder`."""

    def __init__(self, folder: Path | str):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.picochat"
        self._fh: IO[bytes] | None = self.path.open("ab")
        self._write(event_bytes(time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        if self._fh is not None:
            self._fh.write(record_bytes(data))
            self._fh.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        finite = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if finite:
            self._write(event_bytes(time.time() if wall_time is None else wall_time, step, scalars=finite))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
