"""Process-wide state that code under test may change: torch's thread count and RNG, Python's and NumPy's RNGs,
the environment, and the notices already said once. Tests must not see each other's changes, whatever order they
run in."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from vopd_bench import modeling


@contextmanager
def preserved_global_state() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch_rng = torch.get_rng_state()
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    environ = dict(os.environ)
    said = set(modeling._said)  # a notice said once by an earlier test would be missing from this one's output
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
        modeling._said.clear()
        modeling._said.update(said)
