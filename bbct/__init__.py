"""bbct: a bit-accurate integer inference simulator for BERT-family models.

The sub-packages live in the repository's pipeline folders and install under this name
(``bbct.golden``, ``bbct.simulator``, ``bbct.kernels``), so bbct never shadows, nor is
shadowed by, another distribution of the same short names.
"""

__version__ = "0.2.0"
