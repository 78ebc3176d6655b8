"""bbct: a bit-accurate integer inference simulator for BERT-family models.

The sub-packages live in the repository's pipeline folders and install under this name
(``bbct.golden``, ``bbct.simulator``, ``bbct.kernels``), so bbct never shadows, nor is
shadowed by, another distribution of the same short names.
"""

from pathlib import Path

__version__ = "0.2.0"

# In a source checkout (tests and tools run from the repository root, or a second working
# tree of it) the pipeline folders sit beside this package: resolve bbct.* there, so a
# checkout always runs its own code, whichever checkout was installed in editable mode.
_root = Path(__file__).resolve().parent.parent
if (_root / "setup.cfg").is_file() and (_root / "simulator" / "cli.py").is_file():
    __path__.append(str(_root))
