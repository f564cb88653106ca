"""A minimal TensorBoard event-file writer for scalars, with no TensorFlow or tensorboard dependency.

An event file is a TFRecord stream (length, masked CRC-32C of the length, payload, masked CRC-32C of the
payload) of `tensorflow.Event` protocol buffers; we encode the few fields a scalar needs by hand:
  Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step & (2**64 - 1)))
  if file_version is not None:
    event += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    event += _bytes_field(5, values)
  return event


def encode_record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


class EventWriter:
  """Appends scalar summaries to a new events.out.tfevents.* file in `logdir`."""

  def __init__(self, logdir):
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = logdir / name
    self._file = open(self.path, "ab")
    self._file.write(encode_record(encode_event(time.time(), 0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._file.write(encode_record(encode_event(time.time(), step, values)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
