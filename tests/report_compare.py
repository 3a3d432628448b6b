"""Compares two nested reports (dicts, lists, numbers, strings) computed
along different code paths: the same structure and the same strings,
integers and choices; floats within a stated absolute tolerance."""

import math
import numbers


def assert_close(actual, expected, atol, exact_keys=(), path="report"):
  """Raises AssertionError naming the first place `actual` and `expected`
  differ. Floats may differ by `atol`; values under a key in `exact_keys`
  (e.g. a chosen penalty) must be equal."""
  if isinstance(expected, dict):
    assert isinstance(actual, dict) and set(actual) == set(expected), (
        f"{path}: keys {sorted(actual)} != {sorted(expected)}")
    for k in expected:
      assert_close(actual[k], expected[k], atol, exact_keys, f"{path}[{k!r}]")
  elif isinstance(expected, (list, tuple)):
    assert isinstance(actual, (list, tuple)) and len(actual) == len(
        expected), f"{path}: {actual} != {expected}"
    for i, (a, e) in enumerate(zip(actual, expected)):
      assert_close(a, e, atol, exact_keys, f"{path}[{i}]")
  elif (isinstance(expected, float) and isinstance(actual, numbers.Real)
        and not any(f"[{k!r}]" in path for k in exact_keys)):
    assert (math.isnan(actual) and math.isnan(expected)) or abs(
        actual - expected) <= atol, f"{path}: {actual} != {expected} ± {atol}"
  else:
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"
