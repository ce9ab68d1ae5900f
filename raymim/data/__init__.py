"""Ray Data pipeline: discover -> read -> preprocess -> crop -> Parquet shards; shard reading; phantoms.

Submodules import torch / MONAI / Ray lazily enough that ``raymim.data.synth`` stays light.
"""
