"""Module-level megatron-core layer specs, one per longshard attention variant (its default options), for
Megatron-LM's ``--spec MODULE NAME``, which imports ``MODULE`` and reads the module attribute ``NAME``::

    python pretrain_gpt.py ... --spec longshard.parallel.megatron_specs s2_layer_spec

``<variant>_layer_spec`` is :func:`longshard.parallel.megatron.longshard_layer_spec` of that variant
with its default options (RMSNorm, no QK layer norm, ring under context parallelism). Importing this
module imports megatron-core (nothing else in longshard does until asked). Other options: build a spec
with ``longshard_layer_spec(name, options, ...)`` in a module of your own and point ``--spec`` at it.
"""

from __future__ import annotations

from longshard.models.attention import available_attention
from longshard.parallel.megatron import longshard_layer_spec

SUFFIX = "_layer_spec"

for _variant in available_attention():
    globals()[f"{_variant}{SUFFIX}"] = longshard_layer_spec(_variant)
del _variant
