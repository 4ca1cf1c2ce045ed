"""longshard: training long-context language models across many GPUs.

Subpackages: ``longshard.models`` (single-device model code and the attention registry),
``longshard.parallel`` (data/sequence parallelism applied from outside), ``longshard.kernels``
(reference and fast attention kernels), ``longshard.train`` (configs, data, trainer, evaluation).
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# This folder (the repository root) is the package itself. When it is on sys.path (``python -m`` run from
# a clone's root puts the working directory there), its kernels/, models/, train/ would import as
# top-level modules and shadow other packages of those names (transformers imports a `kernels` package).
_root = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
