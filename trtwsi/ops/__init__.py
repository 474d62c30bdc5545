"""Pre- and post-processing ops.

``reference``: plain torch on the CPU, exact and documented — the oracle every CUDA kernel is
checked against (preprocess/letterbox, head decode, class-aware NMS, tile → slide mapping).
"""
