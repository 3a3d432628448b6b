"""Shared plotting helpers: matplotlib on the Agg backend, images for display."""

import numpy as np


def pyplot():
  """matplotlib.pyplot with the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def span_at_least(low, high, span, bounds=(0.0, 1.0)):
  """(low, high) inside `bounds`, widened about its centre to at least
  `span` (still inside `bounds`): an axis on which differences much smaller
  than `span` do not look large."""
  low, high = max(bounds[0], low), min(bounds[1], high)
  if high - low < span:
    centre = min(max((low + high) / 2, bounds[0] + span / 2),
                 bounds[1] - span / 2)
    low, high = centre - span / 2, centre + span / 2
  return low, high


def to_display(image):
  """[h, w, C] image in [-1, 1] -> (array for imshow, cmap).

  One channel is shown in grey, three as RGB, any other count as the mean of
  the channels in grey.
  """
  image = np.clip((np.asarray(image, np.float32) + 1.) / 2., 0., 1.)
  if image.ndim == 2:
    return image, "gray"
  if image.shape[-1] == 3:
    return image, None
  return image.mean(axis=-1), "gray"
