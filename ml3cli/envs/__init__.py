"""Simulators: the "real systems" of the robot and RL experiments (MuJoCo, PyBullet, differentiable torch)."""
