"""Baselines that are not losses: trajectory optimisers and other methods the learned losses are compared with."""
