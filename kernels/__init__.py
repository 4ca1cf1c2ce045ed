"""Attention kernels: each op folder holds a plain PyTorch ``naive.py`` reference beside its fast paths."""
