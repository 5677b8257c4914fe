"""Write a URDF for PyBullet from a compiled MuJoCo model: the Sawyer arm of gym-sawyer 0.2.0.

PyBullet cannot load gym-sawyer's MJCF (it ignores ``<include>``) and pybullet_data ships no Sawyer, so this
converter reads the model with MuJoCo and writes the kinematic tree as a URDF. It uses the COMPILED ``MjModel``
(includes, defaults and ``inertiafromgeom`` already resolved), one URDF link per MuJoCo body below ``root``,
under a massless link ``base`` with an identity frame (see the comment in :func:`model_to_urdf` for why):

* link frame = body frame; joint origin = ``body_pos`` / ``body_quat`` (relative to the parent body);
* inertial = ``body_mass``, the principal moments ``body_inertia`` in the frame ``body_ipos`` / ``body_iquat``
  (written as the inertial ``origin`` with ``rpy``, so no off-diagonal terms are needed);
* hinge joints named in ``joints`` → ``revolute`` with ``jnt_axis`` and ``jnt_range``; every other body (no joint,
  or a joint not kept such as the gripper's two finger slides) → ``fixed``: its mass and inertia stay in the
  tree, rigidly attached, so the arm's M(q) includes the gripper.

Damping, armature and friction loss are NOT written: PyBullet's ``calculateInverseDynamics`` and
``calculateMassMatrix`` are rigid-body only; the MuJoCo side of the cross-check zeroes them (see
:func:`ml3cli.envs.sawyer.sawyer_mujoco_model`).

Regenerate the shipped file (the gym-sawyer sdist from ``pip download --no-deps --no-binary :all:
gym-sawyer==0.2.0``, unpacked)::

    python -m ml3cli.envs.mjcf_to_urdf gym-sawyer-0.2.0/sawyer/vendor/mujoco_models/reacherenv_default.xml \
        ml3cli/data/sawyer/sawyer.urdf
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml3cli.errors import simulators_needed

with simulators_needed("the MJCF to URDF conversion (MuJoCo)"):
    import mujoco

#: the 7 arm joints of the Sawyer, base to wrist.
SAWYER_JOINTS = ("right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6")
SAWYER_ROOT = "right_arm_base_link"


def quat_to_rpy(quat: Sequence[float]) -> tuple[float, float, float]:
    """URDF roll-pitch-yaw (R = Rz(yaw) Ry(pitch) Rx(roll)) of a MuJoCo quaternion (w, x, y, z).

    Near gimbal lock (|pitch| → 90°, e.g. the Sawyer's quat (0.707, 0, −0.707, 0)) roll and yaw are each
    ill-conditioned but their combination is not: roll is taken as it comes (0 exactly at the lock), pitch from
    the well-conditioned atan2, and yaw solved from R (Ry(pitch) Rx(roll))ᵀ, so the angles reproduce R to
    rounding error.
    """
    rot = np.zeros(9)
    mujoco.mju_quat2Mat(rot, np.asarray(quat, dtype=float) / np.linalg.norm(quat))
    r = rot.reshape(3, 3)
    pitch = math.atan2(-r[2, 0], math.hypot(r[0, 0], r[1, 0]))
    roll = math.atan2(r[2, 1], r[2, 2]) if math.hypot(r[2, 1], r[2, 2]) > 1e-12 else 0.0
    cp, sp, cr, sr = math.cos(pitch), math.sin(pitch), math.cos(roll), math.sin(roll)
    pitch_roll = np.array([[cp, sp * sr, sp * cr], [0.0, cr, -sr], [-sp, cp * sr, cp * cr]])
    yaw_only = r @ pitch_roll.T
    return roll, pitch, math.atan2(yaw_only[1, 0], yaw_only[0, 0])


def _fmt(values: Sequence[float]) -> str:
    # repr of a float round-trips exactly; tiny rounding noise (|x| < 1e-15) is written as 0 for readability.
    return " ".join(repr(0.0 if abs(float(v)) < 1e-15 else float(v)) for v in values)


def _origin(pos: Sequence[float], quat: Sequence[float]) -> str:
    return f'<origin xyz="{_fmt(pos)}" rpy="{_fmt(quat_to_rpy(quat))}"/>'


def model_to_urdf(
    model: mujoco.MjModel,
    root: str = SAWYER_ROOT,
    joints: Sequence[str] = SAWYER_JOINTS,
    name: str = "sawyer",
    header: str = "",
) -> str:
    """The URDF text of the subtree of body ``root`` of ``model``; hinge joints in ``joints`` stay revolute.

    Raises ValueError for what a URDF cannot express here: a kept joint that is not a hinge, a joint whose anchor
    is not at its body's origin, or a body with more than one kept joint.
    """
    root_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, root)
    if root_id < 0:
        raise ValueError(f"the model has no body {root!r}")
    keep = set(joints)
    known = {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j) for j in range(model.njnt)}
    if missing := keep - known:
        raise ValueError(f"the model has no joints {sorted(missing)}")
    children: dict[int, list[int]] = {}
    for body in range(1, model.nbody):
        children.setdefault(int(model.body_parentid[body]), []).append(body)
    subtree, stack = [], [root_id]
    while stack:
        body = stack.pop(0)
        subtree.append(body)
        stack[:0] = children.get(body, [])

    def body_name(body: int) -> str:
        return mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, body) or f"body{body}"

    lines = ['<?xml version="1.0"?>']
    if header:
        lines.append("<!--\n" + header.rstrip() + "\n-->")
    lines.append(f'<robot name="{name}">')
    # PyBullet makes the root link's INERTIAL frame the multibody's base frame, and its inverse dynamics takes
    # gravity in that frame: with the Sawyer base's rotated inertial frame, gravity came out sideways (relative
    # torque error 2.5 while M(q) agreed to 1e-15). A massless root with an identity frame fixes this exactly.
    lines += [
        '  <link name="base">',
        "    <inertial>",
        '      <origin xyz="0 0 0" rpy="0 0 0"/>',
        '      <mass value="0"/>',
        '      <inertia ixx="0" ixy="0" ixz="0" iyy="0" iyz="0" izz="0"/>',
        "    </inertial>",
        "  </link>",
        f'  <joint name="{body_name(root_id)}_fixed" type="fixed">',
        '    <parent link="base"/>',
        f'    <child link="{body_name(root_id)}"/>',
        '    <origin xyz="0 0 0" rpy="0 0 0"/>',
        "  </joint>",
    ]
    for body in subtree:
        mass = float(model.body_mass[body])
        lines += [
            f'  <link name="{body_name(body)}">',
            "    <inertial>",
            "      " + _origin(model.body_ipos[body], model.body_iquat[body]),
            f'      <mass value="{_fmt([mass])}"/>',
            '      <inertia ixx="{}" ixy="0" ixz="0" iyy="{}" iyz="0" izz="{}"/>'.format(
                *_fmt(model.body_inertia[body]).split()
            ),
            "    </inertial>",
            "  </link>",
        ]
    for body in subtree[1:]:
        kept = []
        for j in range(int(model.body_jntadr[body]), int(model.body_jntadr[body] + model.body_jntnum[body])):
            jname = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j)
            if jname in keep:
                if model.jnt_type[j] != mujoco.mjtJoint.mjJNT_HINGE:
                    raise ValueError(f"joint {jname!r} is not a hinge; only hinges become revolute joints")
                if np.abs(model.jnt_pos[j]).max() > 0:
                    raise ValueError(f"joint {jname!r} is not at its body's origin (pos {model.jnt_pos[j]})")
                kept.append(j)
        if len(kept) > 1:
            raise ValueError(f"body {body_name(body)!r} has {len(kept)} kept joints; a URDF link has one")
        parent = body_name(int(model.body_parentid[body]))
        origin = _origin(model.body_pos[body], model.body_quat[body])
        if kept:
            j = kept[0]
            jname = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j)
            low, high = (float(v) for v in model.jnt_range[j]) if model.jnt_limited[j] else (-math.pi, math.pi)
            lines += [
                f'  <joint name="{jname}" type="revolute">',
                f'    <parent link="{parent}"/>',
                f'    <child link="{body_name(body)}"/>',
                "    " + origin,
                f'    <axis xyz="{_fmt(model.jnt_axis[j])}"/>',
                f'    <limit lower="{_fmt([low])}" upper="{_fmt([high])}" effort="1000" velocity="10"/>',
                "  </joint>",
            ]
        else:
            lines += [
                f'  <joint name="{body_name(body)}_fixed" type="fixed">',
                f'    <parent link="{parent}"/>',
                f'    <child link="{body_name(body)}"/>',
                "    " + origin,
                "  </joint>",
            ]
    lines.append("</robot>")
    return "\n".join(lines) + "\n"


def check_root_at_origin(model: mujoco.MjModel, root: str = SAWYER_ROOT) -> None:
    """The URDF's base is ``root`` at the world origin, unrotated (PyBullet loads it there); refuse otherwise."""
    data = mujoco.MjData(model)
    mujoco.mj_kinematics(model, data)
    body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, root)
    if np.abs(data.xpos[body]).max() > 1e-12 or np.abs(data.xquat[body] - [1, 0, 0, 0]).max() > 1e-12:
        raise ValueError(f"body {root!r} is at {data.xpos[body]} / {data.xquat[body]}, not the unrotated origin")


HEADER = """Generated by `python -m ml3cli.envs.mjcf_to_urdf` from the Sawyer MuJoCo model (sawyer_robot.xml) of
gym-sawyer 0.2.0 (MIT licence, see NOTICE.txt beside this file). Do not edit: regenerate.
Root: a massless link "base" at the world origin; right_arm_base_link is fixed to it. Revolute: right_j0 ... right_j6. The gripper's finger slides are
fixed (their bodies' mass stays attached). Damping/armature of the MJCF are not modelled (rigid body only)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert an MJCF file to the URDF PyBullet loads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mjcf", type=Path, help="the MuJoCo model file (e.g. gym-sawyer's reacherenv_default.xml)")
    parser.add_argument("urdf", type=Path, help="where to write the URDF")
    args = parser.parse_args(argv)
    model = mujoco.MjModel.from_xml_path(str(args.mjcf))
    check_root_at_origin(model)
    from ml3cli.files import write_text_atomic

    write_text_atomic(args.urdf, model_to_urdf(model, header=HEADER))
    print(f"wrote {args.urdf}")


if __name__ == "__main__":
    main()
