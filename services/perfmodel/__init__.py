"""Predict a cluster before buying it: calibrate, the formula, a delaying link, cost."""
