"""longshard: training long-context language models across many GPUs.

Subpackages: ``longshard.models`` (single-device model code and the attention registry),
``longshard.parallel`` (data/sequence parallelism applied from outside), ``longshard.kernels``
(reference and fast attention kernels), ``longshard.train`` (configs, data, trainer, evaluation).
"""

__version__ = "0.1.0"
