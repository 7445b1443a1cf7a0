"""Compiled kernels. Private: call the public functions in ``fastloss``."""
