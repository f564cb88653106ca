"""Token counts written the short way: "2k" is 2**11 = 2048, "1m" is 2**20 (the passkey_2k ... passkey_1m
tasks' lengths), and "1k,2k,...,1m" continues a geometric series to its end."""

from __future__ import annotations

import re

_LENGTH = re.compile(r"^(\d+)([km]?)$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_length(text: str) -> int:
  """'4096' -> 4096, '2k' -> 2048, '1m' -> 1048576 (k and m are binary, case-insensitive)."""
  match = _LENGTH.match(text.strip().lower())
  if not match or int(match.group(1)) < 1:
    raise ValueError(f"bad length {text!r}: a positive integer with an optional k (1024) or m "
                     "(1048576) suffix, e.g. 2k")
  return int(match.group(1)) * _UNITS[match.group(2)]


def parse_lengths(spec: str) -> list[int]:
  """'1k,2k,...,16k' -> [1024, 2048, 4096, 8192, 16384]; '...' continues the ratio of the two lengths
  before it up to the one after it, which it must reach exactly."""
  items = [s.strip() for s in spec.split(",") if s.strip()]
  if not items:
    raise ValueError(f"bad length list {spec!r}: give comma-separated lengths like 2k,4k,...,1m")
  out: list[int] = []
  i = 0
  while i < len(items):
    if items[i] != "...":
      out.append(parse_length(items[i]))
      i += 1
      continue
    if len(out) < 2 or i + 1 >= len(items) or items[i + 1] == "...":
      raise ValueError(f"bad length list {spec!r}: '...' needs two lengths before it and one after")
    end = parse_length(items[i + 1])
    a, b = out[-2], out[-1]
    if b <= a or b % a:
      raise ValueError(f"bad length list {spec!r}: '...' continues a growing series with a whole "
                       f"ratio, but {format_length(a)} -> {format_length(b)} is not one")
    while out[-1] < end:
      out.append(out[-1] * (b // a))
    if out[-1] != end:
      raise ValueError(f"bad length list {spec!r}: the series {format_length(a)}, "
                       f"{format_length(b)}, ... does not reach {format_length(end)}")
    i += 2
  if len(set(out)) != len(out):
    raise ValueError(f"bad length list {spec!r}: a length appears twice")
  return out


def format_length(n: int) -> str:
  """2048 -> '2k', 1048576 -> '1m', 1000 -> '1000' (exact multiples only)."""
  if n >= _UNITS["m"] and n % _UNITS["m"] == 0:
    return f"{n // _UNITS['m']}m"
  if n >= _UNITS["k"] and n % _UNITS["k"] == 0:
    return f"{n // _UNITS['k']}k"
  return str(n)
