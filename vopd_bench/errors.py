"""The two kinds of failure vopd distinguishes.

A `VopdError` stops the run: the CLI prints its message as one line and exits non-zero.
A `SampleError` concerns one sample: it is recorded in samples.jsonl with its reason and the run goes on.
"""


class VopdError(Exception):
    """A run-level error whose message is fit to show the user as is."""


class SampleError(VopdError):
    """A problem with a single sample (bad row, corrupt image, invalid box)."""
