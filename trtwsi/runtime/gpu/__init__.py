"""runtime/gpu"""
