"""Baselines that are not losses: learning methods the learned losses are compared with (PPO).

They may use the task interface and the primitives (:mod:`ml3cli.rl`, :mod:`ml3cli.envs`, ...); no task imports
them. The iLQR solver, a baseline on the mountain car and the expert behind the demonstrations, lives in
:mod:`ml3cli.control`.
"""
