"""vopd_bench: measure the regional-to-global perception gap of multimodal LLMs."""

__version__ = "0.1.0"
