"""Inverse dynamics with a physics prior (paper, section 4.2.2, equation 10, figure 5c–d).

Data sheet
    Robots: ``inverse_dynamics_reacher``: gymnasium's 2-link planar Reacher simulated with MuJoCo
    (:mod:`ml3cli.envs.reacher_dynamics`); ``inverse_dynamics_sawyer``: the 7-DoF Sawyer in PyBullet from the
    URDF generated from gym-sawyer's MJCF (:mod:`ml3cli.envs.sawyer`). Gravity (0, 0, −9.81) m/s² in both.
    Trajectories: per joint j, q_j(t) = c_j + Σ_k a_jk sin(ω_jk t + φ_jk) (``harmonics`` terms, ω ~ U[``omega_range``]
    rad/s, t ∈ [0, ``duration``] s), with Σ_k |a_jk| + |c_j − mid_j| ≤ ``limit_margin`` × half the joint range, so
    q stays within the joint limits; q̇ and q̈ are the exact derivatives. Ground truth at ``samples`` times per
    trajectory: u = M(q) q̈ + F(q, q̇) and M(q) from the simulator.
    Splits: ``split: meta_train`` and ``split: meta_test`` are different trajectories (their own seed streams from
    ``data_seed``). Each split has ``trajectories`` trajectories whose samples the inner steps train on, and
    ``held_out_trajectories`` others on which the task loss (prediction error) is measured. Generation is
    deterministic per (robot, settings) and cached as ``.npz`` under ``cache_dir`` (key: a hash of the settings).
    A task: ``points`` samples drawn from the training trajectories and ``query_points`` from the held-out ones.
    Optimizee (Deep Lagrangian Networks, Lutter et al. 2019): L_θ(q) lower-triangular with a softplus-positive
    diagonal, M_θ(q) = L Lᵀ + ε I (symmetric positive definite), F_θ(q, q̇) an MLP; û = M_θ(q) q̈ + F_θ(q, q̇).
    Both networks see the joint angles as (sin q, cos q).
    Loss inputs: (û_j, u_j) per joint: ``[points, joints, 1]`` each, so M_φ is shared per joint (summed over joints,
    averaged over samples) and one learned loss serves 2 or 7 joints.
    Task loss (``torque_mse``): mean over held-out samples of Σ_j (û_j − u_j)². Extra (shaping) term
    ``inertia_prior`` = mean over held-out samples of ‖M_θ(q) − M(q)‖²_F (the physics prior, meta-train only).
    Reported at meta-test: ``inertia_error`` = mean ‖M_θ(q) − M(q)‖_F on the held-out samples.
    Environment samples (``Task.environment_samples``): the split's data set, one sample per simulated time point
    ((``trajectories`` + ``held_out_trajectories``) × ``samples``: one inverse-dynamics and one mass-matrix query
    of the simulator each), counted once per task object whether generated or read from the cache; training on
    it simulates nothing more.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from torch import Tensor, nn

from ml3cli.errors import ML3Error
from ml3cli.metaloss import LossInput
from ml3cli.tasks.base import Task, TaskOptions, Theta

#: bump when the generated data would change for the same settings (invalidates caches)
DATA_FORMAT = 1
Robot = Literal["reacher", "sawyer"]
Split = Literal["meta_train", "meta_test"]
SPLIT_STREAM = {"meta_train": 0, "meta_test": 1}
ROBOT_STREAM = {"reacher": 0, "sawyer": 1}


def default_cache_dir() -> Path:
    """``$ML3_CACHE_DIR/inverse_dynamics`` if set, else ``~/.cache/ml3/inverse_dynamics``."""
    base = os.environ.get("ML3_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "ml3") / "inverse_dynamics"


# -- the simulators -------------------------------------------------------------------------------------------
def robot_dynamics(robot: Robot):
    """The simulator of ``robot`` (imported lazily: MuJoCo / PyBullet load only when a task needs them)."""
    if robot == "reacher":
        from ml3cli.envs.reacher_dynamics import ReacherDynamics

        return ReacherDynamics()
    from ml3cli.envs.sawyer import SawyerDynamics

    return SawyerDynamics()


def robot_dof(robot: Robot) -> int:
    """The number of joints of ``robot``."""
    return {"reacher": 2, "sawyer": 7}[robot]


# -- data -----------------------------------------------------------------------------------------------------
class TrajectorySettings(NamedTuple):
    """Everything that determines the generated data (hashed into the cache key)."""

    robot: str
    split: str
    data_seed: int
    trajectories: int
    held_out_trajectories: int
    samples: int
    duration: float
    harmonics: int
    omega_range: tuple[float, float]
    limit_margin: float


def sinusoid_trajectories(
    limits: np.ndarray,
    count: int,
    samples: int,
    duration: float,
    harmonics: int,
    omega_range: tuple[float, float],
    margin: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` smooth joint trajectories sampled at ``samples`` sorted times in [0, duration]: (q, q̇, q̈), each
    ``[count, samples, dof]``. Per joint, q = c + Σ_k a_k sin(ω_k t + φ_k) with |c − mid| + Σ_k a_k ≤ margin ×
    half-range, so every q is inside ``limits`` ``[dof, 2]`` whatever t."""
    dof = limits.shape[0]
    mid, half = limits.mean(axis=1), margin * (limits[:, 1] - limits[:, 0]) / 2
    total = half * rng.uniform(0.3, 1.0, size=(count, dof))  # Σ_k a_k per trajectory and joint
    weights = rng.uniform(0.2, 1.0, size=(count, dof, harmonics))
    amplitude = total[..., None] * weights / weights.sum(-1, keepdims=True)
    center = mid + rng.uniform(-1.0, 1.0, size=(count, dof)) * (half - total)
    omega = rng.uniform(*omega_range, size=(count, dof, harmonics))
    phase = rng.uniform(0.0, 2 * np.pi, size=(count, dof, harmonics))
    t = np.sort(rng.uniform(0.0, duration, size=(count, samples)), axis=1)
    angle = omega[:, None] * t[:, :, None, None] + phase[:, None]  # [count, samples, dof, harmonics]
    a = amplitude[:, None]
    q = center[:, None] + (a * np.sin(angle)).sum(-1)
    qd = (a * omega[:, None] * np.cos(angle)).sum(-1)
    qdd = -(a * omega[:, None] ** 2 * np.sin(angle)).sum(-1)
    return q, qd, qdd


def generate(settings: TrajectorySettings) -> dict[str, np.ndarray]:
    """The data of one split: q, qd, qdd, u ``[trajectories_total, samples, dof]`` and M ``[…, dof, dof]``, where the
    first ``trajectories`` trajectories are for training and the rest held out. Deterministic in ``settings``."""
    dynamics = robot_dynamics(settings.robot)  # type: ignore[arg-type]
    rng = np.random.default_rng(
        [settings.data_seed, ROBOT_STREAM[settings.robot], SPLIT_STREAM[settings.split], DATA_FORMAT]
    )
    count = settings.trajectories + settings.held_out_trajectories
    q, qd, qdd = sinusoid_trajectories(
        dynamics.joint_limits,
        count,
        settings.samples,
        settings.duration,
        settings.harmonics,
        settings.omega_range,
        settings.limit_margin,
        rng,
    )
    dof = dynamics.dof
    u = np.zeros_like(q)
    inertia = np.zeros((*q.shape, dof))
    for i in range(count):
        for s in range(settings.samples):
            inertia[i, s] = dynamics.mass_matrix(q[i, s])
            u[i, s] = dynamics.inverse_dynamics(q[i, s], qd[i, s], qdd[i, s])
    return {"q": q, "qd": qd, "qdd": qdd, "u": u, "M": inertia, "limits": dynamics.joint_limits}


def cache_key(settings: TrajectorySettings) -> str:
    """A short hash of the data format and the trajectory settings: the name of their cache file."""
    text = json.dumps({"format": DATA_FORMAT, **settings._asdict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_or_generate(settings: TrajectorySettings, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """The split's data from the cache (``cache_dir``; None: no cache), generated and written there if absent or
    unreadable. A cached file is used only if its recorded settings equal ``settings``."""
    if cache_dir is None:
        return generate(settings)
    path = Path(cache_dir) / f"{settings.robot}_{settings.split}_{cache_key(settings)}.npz"
    expected = json.dumps(settings._asdict(), sort_keys=True)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                if str(archive["settings"]) == expected:
                    return {k: archive[k] for k in ("q", "qd", "qdd", "u", "M", "limits")}
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a corrupt or foreign file: regenerate and overwrite it
    data = generate(settings)
    buffer = io.BytesIO()
    np.savez(buffer, settings=np.array(expected), **data)
    from ml3cli.files import write_bytes_atomic

    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as err:
        raise ML3Error(f"task_options.cache_dir: cannot write the data cache {path} ({err})") from None
    return data


# -- the optimizee --------------------------------------------------------------------------------------------
def _mlp(width_in: int, hidden: list[int], width_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width_in, h), nn.Softplus()]
        width_in = h
    layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


class DeepLagrangianModel(nn.Module):
    """û = M_θ(q) q̈ + F_θ(q, q̇) with M_θ = L Lᵀ + ε I, L lower-triangular with a softplus-positive diagonal.

    ``forward(q, qd, qdd)`` with ``[..., dof]`` inputs returns ``(û [..., dof], M_θ [..., dof, dof])``.
    """

    def __init__(self, dof: int, hidden: list[int], epsilon: float):
        super().__init__()
        self.dof, self.epsilon = dof, epsilon
        rows, cols = torch.tril_indices(dof, dof, offset=-1)
        # fixed 0/1 maps from the network's outputs into the dof × dof matrix (vmap-friendly, no index writes)
        diag_map = torch.zeros(dof, dof * dof)
        diag_map[torch.arange(dof), torch.arange(dof) * (dof + 1)] = 1.0
        off_map = torch.zeros(rows.numel(), dof * dof)
        off_map[torch.arange(rows.numel()), rows * dof + cols] = 1.0
        self.register_buffer("diag_map", diag_map, persistent=False)
        self.register_buffer("off_map", off_map, persistent=False)
        self.inertia_net = _mlp(2 * dof, hidden, dof + rows.numel())
        self.force_net = _mlp(3 * dof, hidden, dof)

    def mass_matrix(self, q: Tensor) -> Tensor:
        out = self.inertia_net(torch.cat([torch.sin(q), torch.cos(q)], -1))
        diag = nn.functional.softplus(out[..., : self.dof])
        lower = (diag @ self.diag_map + out[..., self.dof :] @ self.off_map).unflatten(-1, (self.dof, self.dof))
        eye = torch.eye(self.dof, dtype=q.dtype, device=q.device)
        return lower @ lower.transpose(-1, -2) + self.epsilon * eye

    def forward(self, q: Tensor, qd: Tensor, qdd: Tensor) -> tuple[Tensor, Tensor]:
        inertia = self.mass_matrix(q)
        force = self.force_net(torch.cat([torch.sin(q), torch.cos(q), qd], -1))
        return (inertia @ qdd.unsqueeze(-1)).squeeze(-1) + force, inertia


# -- losses over (û_j, u_j) per joint --------------------------------------------------------------------------
def torque_mse(u_pred: Tensor, u_true: Tensor) -> Tensor:
    """Σ_j (û_j − u_j)², mean over samples (inputs ``[samples, joints, 1]``)."""
    return ((u_pred - u_true) ** 2).reshape(u_pred.shape[0], -1).sum(-1).mean()


def torque_l1(u_pred: Tensor, u_true: Tensor) -> Tensor:
    """Σ_j |û_j − u_j|, mean over samples."""
    return (u_pred - u_true).abs().reshape(u_pred.shape[0], -1).sum(-1).mean()


def torque_huber(u_pred: Tensor, u_true: Tensor) -> Tensor:
    """Σ_j Huber_δ=1(û_j − u_j), mean over samples."""
    per = nn.functional.huber_loss(u_pred, u_true, delta=1.0, reduction="none")
    return per.reshape(u_pred.shape[0], -1).sum(-1).mean()


# -- the task family ------------------------------------------------------------------------------------------
class InverseDynamicsBatch(NamedTuple):
    """A batch of inverse-dynamics tasks; shapes with the leading task axis ``n`` and ``dof`` joints."""

    q: Tensor  # [n, points, dof]  training samples (inner steps)
    qd: Tensor
    qdd: Tensor
    u: Tensor  # [n, points, dof]  torques
    q_query: Tensor  # [n, query_points, dof]  held-out trajectories (task loss, metrics)
    qd_query: Tensor
    qdd_query: Tensor
    u_query: Tensor
    inertia_query: Tensor  # [n, query_points, dof, dof]  M(q) from the simulator


class InverseDynamicsOptions(TaskOptions):
    """Settings of the inverse-dynamics task family (data generation, task size, optimizee)."""

    split: Split = Field("meta_train", description="which trajectories: meta_train or meta_test (disjoint)")
    data_seed: int = Field(0, description="seed of the trajectory generation (with the robot and split)")
    trajectories: PositiveInt = Field(8, description="training trajectories per split (inner steps sample these)")
    held_out_trajectories: PositiveInt = Field(4, description="held-out trajectories per split (task loss)")
    samples: PositiveInt = Field(200, description="time samples per trajectory")
    duration: PositiveFloat = Field(20.0, description="trajectory length in seconds")
    harmonics: PositiveInt = Field(3, description="sinusoids per joint")
    omega_range: tuple[PositiveFloat, PositiveFloat] = Field((0.5, 2.0), description="ω ~ U[low, high] in rad/s")
    limit_margin: float = Field(0.8, gt=0.0, le=1.0, description="trajectories use this share of each joint range")
    points: PositiveInt = Field(128, description="training samples per task (the inner steps' batch)")
    query_points: PositiveInt = Field(256, description="held-out samples per task (task loss and metrics)")
    hidden: list[PositiveInt] = Field([64, 64], description="hidden widths of both optimizee networks (L_θ, F_θ)")
    epsilon: PositiveFloat = Field(1e-3, description="ε in M_θ = L Lᵀ + ε I")
    cache_dir: str | None = Field(
        None, description="folder of the generated-data cache (default $ML3_CACHE_DIR or ~/.cache/ml3)"
    )
    no_cache: bool = Field(False, description="generate the data in memory, never read or write the cache")
    normalize_torques: bool = Field(
        False,
        description="the loss sees û_j / s_j and u_j / s_j, s_j the std of joint j's torque over the meta-train "
        "split's training trajectories, so that the loss, shared by every joint, sees every joint on one scale",
    )

    @field_validator("omega_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"give (low, high) with low < high, got {value}")
        return value


INPUTS = (
    LossInput("u_pred", 1, "predicted torque û_j of one joint (one row per joint)", groups=("joint",)),
    LossInput("u_true", 1, "simulated torque u_j of that joint", groups=("joint",)),
)


class InverseDynamics(Task):
    """The shared implementation; the registered families fix the robot."""

    robot: ClassVar[Robot]
    Options = InverseDynamicsOptions
    loss_inputs_spec = INPUTS
    metric = "torque_mse"
    builtin_losses = {"torque_mse": torque_mse, "l1": torque_l1, "huber": torque_huber}
    extra_term_names = ("inertia_prior",)
    # online adaptation's validation loss: torque MSE on the training samples (the prior's M(q) is never read)
    query_from_support = {"q_query": "q", "qd_query": "qd", "qdd_query": "qdd", "u_query": "u"}

    def __init__(self, options: TaskOptions | None = None, device: torch.device | str = "cpu"):
        super().__init__(options, device)
        opts = self.options
        settings = TrajectorySettings(
            self.robot,
            opts.split,
            opts.data_seed,
            opts.trajectories,
            opts.held_out_trajectories,
            opts.samples,
            opts.duration,
            opts.harmonics,
            tuple(opts.omega_range),
            opts.limit_margin,
        )
        cache = None if opts.no_cache else (Path(opts.cache_dir) if opts.cache_dir else default_cache_dir())
        data = load_or_generate(settings, cache)
        self.environment_samples += (opts.trajectories + opts.held_out_trajectories) * opts.samples
        self.joint_limits = torch.as_tensor(data["limits"], dtype=torch.float32)
        split = opts.trajectories

        def pool(name: str, part: slice) -> Tensor:
            array = data[name][part]
            return torch.as_tensor(array.reshape(-1, *array.shape[2:]), dtype=torch.float32)

        names = ("q", "qd", "qdd", "u", "M")
        self.train_pool = {n: pool(n, slice(None, split)) for n in names}
        self.held_out_pool = {n: pool(n, slice(split, None)) for n in names}
        # s_j: from the meta-train split's training trajectories whichever split this is, so that a loss learned
        # on one split sees the other's torques on the same scale
        train_data = (
            data if opts.split == "meta_train" else load_or_generate(settings._replace(split="meta_train"), cache)
        )
        self.torque_scales = torch.as_tensor(
            train_data["u"][:split].reshape(-1, self.dof).std(axis=0) if opts.normalize_torques else np.ones(self.dof),
            dtype=torch.float32,
        )
        if opts.normalize_torques:
            self.builtin_losses = {
                "torque_mse": self._in_newton_metres(torque_mse),
                "normalized_mse": torque_mse,
                "l1": self._in_newton_metres(torque_l1),
                "huber": self._in_newton_metres(torque_huber),
            }
        for what, need, have in (
            ("points", opts.points, self.train_pool["q"].shape[0]),
            ("query_points", opts.query_points, self.held_out_pool["q"].shape[0]),
        ):
            if need > have:
                raise ML3Error(f"task_options.{what}: {need} asked, but the trajectories give only {have} samples")

    @property
    def dof(self) -> int:
        return robot_dof(self.robot)

    def _in_newton_metres(self, loss):
        """``loss`` of the torques in N·m, from the normalised inputs (the hand-written losses keep their meaning)."""
        scales = self.torque_scales.reshape(self.dof, 1)

        def in_newton_metres(u_pred: Tensor, u_true: Tensor) -> Tensor:
            return loss(u_pred * scales.to(u_pred), u_true * scales.to(u_true))

        in_newton_metres.__name__ = loss.__name__
        return in_newton_metres

    def provenance(self) -> dict[str, object]:
        """The per-joint torque scales s_j the loss inputs are divided by (recorded in the artifact)."""
        return {"torque_scales": [float(v) for v in self.torque_scales]} if self.options.normalize_torques else {}

    def build_optimizee(self) -> nn.Module:
        return DeepLagrangianModel(self.dof, list(self.options.hidden), self.options.epsilon)

    def sample_tasks(self, n: int, generator: torch.Generator) -> InverseDynamicsBatch:
        """``n`` tasks, each ``points`` distinct training samples and ``query_points`` distinct held-out samples."""
        picks: list[list[Tensor]] = [[] for _ in InverseDynamicsBatch._fields]
        for _ in range(n):
            train = torch.randperm(self.train_pool["q"].shape[0], generator=generator)[: self.options.points]
            held = torch.randperm(self.held_out_pool["q"].shape[0], generator=generator)[: self.options.query_points]
            values = [self.train_pool[k][train] for k in ("q", "qd", "qdd", "u")]
            values += [self.held_out_pool[k][held] for k in ("q", "qd", "qdd", "u", "M")]
            for slot, value in zip(picks, values, strict=True):
                slot.append(value)
        return InverseDynamicsBatch(*(torch.stack(p).to(self.device) for p in picks))

    def _model(self, theta: Theta, q: Tensor, qd: Tensor, qdd: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.functional_call(self.optimizee, theta, (q, qd, qdd))

    def loss_inputs(self, theta: Theta, task: InverseDynamicsBatch) -> dict[str, Tensor]:
        u_pred, _ = self._model(theta, task.q, task.qd, task.qdd)
        scales = self.torque_scales.to(u_pred)  # ones unless normalize_torques
        return {"u_pred": (u_pred / scales).unsqueeze(-1), "u_true": (task.u / scales).unsqueeze(-1)}

    def task_loss(self, theta: Theta, task: InverseDynamicsBatch) -> Tensor:
        u_pred, _ = self._model(theta, task.q_query, task.qd_query, task.qdd_query)
        return torque_mse(u_pred, task.u_query)

    def _inertia_gap(self, theta: Theta, task: InverseDynamicsBatch) -> Tensor:
        """‖M_θ(q) − M(q)‖²_F per held-out sample, ``[query_points]``."""
        _, inertia = self._model(theta, task.q_query, task.qd_query, task.qdd_query)
        return ((inertia - task.inertia_query) ** 2).sum((-1, -2))

    def extra_term(self, name: str, theta: Theta, task: InverseDynamicsBatch) -> Tensor:
        if name == "inertia_prior":
            return self._inertia_gap(theta, task).mean()
        return super().extra_term(name, theta, task)

    def report_metrics(self, theta: Theta, task: InverseDynamicsBatch) -> dict[str, Tensor]:
        return {"inertia_error": self._inertia_gap(theta, task).sqrt().mean()}


class InverseDynamicsReacher(InverseDynamics):
    name = "inverse_dynamics_reacher"
    summary = "inverse dynamics of the MuJoCo 2-link Reacher, Deep-Lagrangian optimizee; extra term inertia_prior"
    robot = "reacher"


class InverseDynamicsSawyer(InverseDynamics):
    name = "inverse_dynamics_sawyer"
    summary = "inverse dynamics of the 7-DoF Sawyer in PyBullet, Deep-Lagrangian optimizee; extra term inertia_prior"
    robot = "sawyer"
