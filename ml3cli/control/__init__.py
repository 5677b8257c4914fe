"""Trajectory optimisation: control-limited iLQR and the reacher's iLQR experts.

A primitive layer (beside :mod:`ml3cli.envs`): tasks use it to generate data (the expert demonstrations of
``reacher_demos``), experiments use it as a baseline (iLQR on the mountain car). It knows no task, loss or
baseline.
"""
