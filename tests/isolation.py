"""Process-wide state that code under test may change: torch's thread count and RNG, Python's and NumPy's RNGs,
and the environment. Tests must not see each other's changes, whatever order they run in."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_global_state() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch_rng = torch.get_rng_state()
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    environ = dict(os.environ)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
