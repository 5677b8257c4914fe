"""MuJoCo models that ship inside installed packages (nothing is fetched at run time)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from ml3cli.errors import simulators_needed

with simulators_needed("the MuJoCo models"):
    import mujoco


def gymnasium_asset(name: str) -> Path:
    """The path of one of gymnasium's MuJoCo model files, e.g. ``reacher.xml``."""
    with simulators_needed("gymnasium's MuJoCo models"):
        import gymnasium.envs.mujoco

    path = Path(gymnasium.envs.mujoco.__file__).parent / "assets" / name
    if not path.is_file():
        raise FileNotFoundError(f"gymnasium ships no MuJoCo model {name!r} (looked in {path.parent})")
    return path


@cache
def _reacher_xml() -> str:
    return gymnasium_asset("reacher.xml").read_text()


def reacher_model() -> mujoco.MjModel:
    """A fresh copy of gymnasium's 2-link planar Reacher (the paper's ReacherGoal arm): joints ``joint0``,
    ``joint1`` (hinges), the target's two slide joints ``target_x``, ``target_y``; bodies ``fingertip``,
    ``target``; timestep 0.01 s with frame skip 2 in gymnasium's environment."""
    return mujoco.MjModel.from_xml_string(_reacher_xml())
