"""batch/pools"""
