"""Control-limited iLQR (Tassa, Mansard, Todorov: "Control-limited differential dynamic programming", ICRA 2014).

Minimises over open-loop controls u_0 … u_{T−1}

    J(U) = Σ_t ℓ(x_t, u_t, t) + ℓ_f(x_T),        x_{t+1} = f(x_t, u_t),  x_0 given,  lower ≤ u_t ≤ upper

with dynamics and costs given as torch functions of ONE state ``[n]`` and control ``[m]``; their first and second
derivatives come from torch autograd (``torch.func.jacrev`` / ``hessian``, vectorised over time with ``vmap``).
Everything runs in float64.

One iteration: linearise f and take second-order expansions of the costs along the current trajectory; a
backward pass solves, at every t, the box-constrained QP

    min_δu  ½ δuᵀ Q_uu δu + Q_uᵀ δu   s.t.  lower ≤ u_t + δu ≤ upper

by projected Newton (:func:`box_qp`, Tassa et al. algorithm 3) for the open-loop step k_t; the feedback gain K_t
acts only on the free (unclamped) controls. A forward pass with a backtracking line search on α rolls out
u_t = clip(ū_t + α k_t + K_t (x_t − x̄_t)). Regularisation μ is added and raised when
Q_uu is not positive definite or no step is accepted: on Q_uu (``regularize="control"``, the default, which
also copes with steps where a control has no effect, e.g. a car held by a wall with zero control cost) or on V_xx
(``"state"``, Tassa et al. 2012). Without limits this is plain iLQR: on a linear system with
quadratic cost the first iteration returns the exact LQR solution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

Dynamics = Callable[[Tensor, Tensor], Tensor]  # f(x [n], u [m]) -> x' [n]
RunningCost = Callable[[Tensor, Tensor, Tensor], Tensor]  # ℓ(x [n], u [m], t []) -> scalar
FinalCost = Callable[[Tensor], Tensor]  # ℓ_f(x [n]) -> scalar


@dataclass(frozen=True)
class BoxQPResult:
    """The minimiser ``x``, which coordinates are ``free`` (not held at a bound), and whether it ``converged``."""

    x: Tensor
    free: Tensor
    converged: bool


def box_qp(
    H: Tensor,
    g: Tensor,
    lower: Tensor,
    upper: Tensor,
    x0: Tensor | None = None,
    max_iter: int = 100,
    min_grad: float = 1e-10,
    min_rel_improve: float = 1e-12,
    step_dec: float = 0.6,
    min_step: float = 1e-22,
    armijo: float = 0.1,
) -> BoxQPResult:
    """min_x ½ xᵀHx + gᵀx subject to lower ≤ x ≤ upper, by projected Newton (Tassa et al. 2014, algorithm 3).

    Each iteration fixes the coordinates that sit at a bound with the gradient pushing outwards, takes the Newton
    step on the others and projects it back into the box with an Armijo line search. ``converged`` is False if
    the free block of H is not positive definite (the caller raises its regularisation).
    """
    n = g.shape[0]
    x = (torch.zeros_like(g) if x0 is None else x0).clamp(lower, upper)
    value = x @ g + 0.5 * x @ H @ x
    free = torch.ones(n, dtype=torch.bool)
    for it in range(max_iter):
        grad = g + H @ x
        clamped = ((x <= lower) & (grad > 0)) | ((x >= upper) & (grad < 0))
        free = ~clamped
        if not bool(free.any()):
            return BoxQPResult(x, free, True)
        H_ff = H[free][:, free]
        chol, info = torch.linalg.cholesky_ex(H_ff)
        if int(info) != 0:
            return BoxQPResult(x, free, False)
        if float(grad[free].norm()) < min_grad:
            break
        # Newton step on the free set, with the clamped coordinates held where they are
        grad_clamped = g + H @ (x * clamped)
        search = torch.zeros_like(x)
        search[free] = -torch.cholesky_solve(grad_clamped[free].unsqueeze(-1), chol).squeeze(-1) - x[free]
        slope = float(search @ grad)
        if slope >= 0:  # no descent left (numerically converged)
            break
        step = 1.0
        while True:
            candidate = (x + step * search).clamp(lower, upper)
            new_value = candidate @ g + 0.5 * candidate @ H @ candidate
            if float(new_value - value) / (step * slope) >= armijo:
                break
            step *= step_dec
            if step < min_step:
                return BoxQPResult(x, free, True)
        improvement = float(value - new_value)
        x, value = candidate, new_value
        if it > 0 and improvement < min_rel_improve * abs(float(value)):
            break
    grad = g + H @ x
    free = ~(((x <= lower) & (grad > 0)) | ((x >= upper) & (grad < 0)))
    return BoxQPResult(x, free, True)


@dataclass
class ILQRResult:
    """The optimised trajectory and what each iteration did.

    ``states [T+1, n]``, ``controls [T, m]``; ``costs[i]`` is J after iteration i (``costs[0]``: the initial
    controls), ``trajectories[i]`` the states then (for plots of a metric against iterations).
    """

    states: Tensor
    controls: Tensor
    costs: list[float] = field(default_factory=list)
    trajectories: list[Tensor] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False


class ILQR:
    """Control-limited iLQR over ``horizon`` steps.

    Args:
        dynamics: f(x [n], u [m]) -> x' [n], a differentiable torch function.
        running_cost: ℓ(x [n], u [m], t) -> scalar (t is a 0-d tensor, so costs may depend on time).
        final_cost: ℓ_f(x [n]) -> scalar.
        horizon: T.
        lower, upper: control limits ``[m]`` (None: unbounded).
    """

    def __init__(
        self,
        dynamics: Dynamics,
        running_cost: RunningCost,
        final_cost: FinalCost,
        horizon: int,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
        mu_init: float = 1e-6,
        mu_min: float = 1e-8,
        mu_max: float = 1e10,
        mu_factor: float = 1.6,
        alphas: tuple[float, ...] = tuple(10.0 ** (-0.5 * i) for i in range(11)),
        tolerance: float = 1e-9,
        regularize: str = "control",
    ):
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        self.dynamics = dynamics
        self.running_cost = running_cost
        self.final_cost = final_cost
        self.horizon = horizon
        self.lower = None if lower is None else torch.as_tensor(lower, dtype=torch.float64)
        self.upper = None if upper is None else torch.as_tensor(upper, dtype=torch.float64)
        self.mu_init, self.mu_min, self.mu_max, self.mu_factor = mu_init, mu_min, mu_max, mu_factor
        self.alphas = alphas
        self.tolerance = tolerance
        if regularize not in ("control", "state"):
            raise ValueError(f"regularize must be 'control' or 'state', got {regularize!r}")
        self.regularize = regularize
        # derivatives along a whole trajectory at once (vmap over t)
        self._f_jac = vmap(jacrev(dynamics, argnums=(0, 1)))
        self._l_grad = vmap(jacrev(running_cost, argnums=(0, 1)))
        self._l_hess = vmap(hessian(running_cost, argnums=(0, 1)))
        self._lf_grad = jacrev(final_cost)
        self._lf_hess = hessian(final_cost)

    # -- pieces ----------------------------------------------------------------------------------------------
    def clip(self, u: Tensor) -> Tensor:
        """``u`` held inside the control limits (element-wise; a missing bound does not clip)."""
        if self.lower is not None:
            u = torch.maximum(u, self.lower)
        if self.upper is not None:
            u = torch.minimum(u, self.upper)
        return u

    def rollout(self, x0: Tensor, controls: Tensor) -> tuple[Tensor, Tensor]:
        """States ``[T+1, n]`` under ``controls [T, m]`` and the total cost J."""
        states = [x0]
        cost = x0.new_zeros(())
        for t in range(self.horizon):
            cost = cost + self.running_cost(states[-1], controls[t], torch.tensor(t, dtype=torch.float64))
            states.append(self.dynamics(states[-1], controls[t]))
        return torch.stack(states), cost + self.final_cost(states[-1])

    def _bounds(self, m: int) -> tuple[Tensor, Tensor]:
        inf = torch.full((m,), torch.inf, dtype=torch.float64)
        lower = -inf if self.lower is None else self.lower.expand(m)
        upper = inf if self.upper is None else self.upper.expand(m)
        return lower, upper

    def backward_pass(self, states: Tensor, controls: Tensor, mu: float) -> tuple[Tensor, Tensor, float, float] | None:
        """Gains ``k [T, m]``, ``K [T, m, n]`` and the expected reduction terms (Σ kᵀQ_u, Σ ½kᵀQ_uu k); None
        if some Q_uu (free block) is not positive definite at regularisation ``mu``."""
        T, m = controls.shape
        n = states.shape[1]
        times = torch.arange(T, dtype=torch.float64)
        fx, fu = self._f_jac(states[:-1], controls)
        lx, lu = self._l_grad(states[:-1], controls, times)
        (lxx, lxu), (lux, luu) = self._l_hess(states[:-1], controls, times)
        del lxu
        Vx = self._lf_grad(states[-1])
        Vxx = self._lf_hess(states[-1])
        k = torch.zeros(T, m, dtype=torch.float64)
        K = torch.zeros(T, m, n, dtype=torch.float64)
        lower, upper = self._bounds(m)
        eye = torch.eye(n, dtype=torch.float64)
        d1 = d2 = 0.0
        for t in reversed(range(T)):
            Qx = lx[t] + fx[t].T @ Vx
            Qu = lu[t] + fu[t].T @ Vx
            Qxx = lxx[t] + fx[t].T @ Vxx @ fx[t]
            if self.regularize == "state":  # μ on V_xx (Tassa et al. 2012): steps stay close in state space
                Vreg = Vxx + mu * eye
                Quu = luu[t] + fu[t].T @ Vreg @ fu[t]
                Qux = lux[t] + fu[t].T @ Vreg @ fx[t]
            else:  # μ on Q_uu (Levenberg–Marquardt): also works where a control has no effect (f_u = 0)
                Quu = luu[t] + fu[t].T @ Vxx @ fu[t] + mu * torch.eye(m, dtype=torch.float64)
                Qux = lux[t] + fu[t].T @ Vxx @ fx[t]
            Quu = 0.5 * (Quu + Quu.T)
            qp = box_qp(Quu, Qu, lower - controls[t], upper - controls[t], x0=k[min(t + 1, T - 1)])
            if not qp.converged:
                return None
            k[t] = qp.x
            if bool(qp.free.any()):
                free = qp.free
                chol, info = torch.linalg.cholesky_ex(Quu[free][:, free])
                if int(info) != 0:
                    return None
                K[t, free] = -torch.cholesky_solve(Qux[free], chol)
            Kt, kt = K[t], k[t]
            Vx = Qx + Kt.T @ Quu @ kt + Kt.T @ Qu + Qux.T @ kt
            Vxx = Qxx + Kt.T @ Quu @ Kt + Kt.T @ Qux + Qux.T @ Kt
            Vxx = 0.5 * (Vxx + Vxx.T)
            d1 += float(kt @ Qu)
            d2 += float(0.5 * kt @ Quu @ kt)
        return k, K, d1, d2

    def forward_pass(self, x0: Tensor, states: Tensor, controls: Tensor, k: Tensor, K: Tensor, alpha: float):
        """Roll out u_t = clip(ū_t + α k_t + K_t (x_t − x̄_t)) from ``x0`` along the nominal ``states`` [T+1, n] and
        ``controls`` [T, m]: the new states, controls and total cost J."""
        new_states = [x0]
        new_controls = []
        cost = x0.new_zeros(())
        for t in range(self.horizon):
            u = self.clip(controls[t] + alpha * k[t] + K[t] @ (new_states[-1] - states[t]))
            cost = cost + self.running_cost(new_states[-1], u, torch.tensor(t, dtype=torch.float64))
            new_controls.append(u)
            new_states.append(self.dynamics(new_states[-1], u))
        return torch.stack(new_states), torch.stack(new_controls), cost + self.final_cost(new_states[-1])

    # -- the solver ------------------------------------------------------------------------------------------
    def solve(self, x0: Tensor, controls: Tensor, iterations: int = 50) -> ILQRResult:
        """Run up to ``iterations`` iLQR iterations from the initial ``controls [T, m]`` (clipped to the limits).

        Stops early when the relative cost reduction is below ``tolerance`` or μ exceeds ``mu_max``.
        """
        x0 = torch.as_tensor(x0, dtype=torch.float64)
        controls = self.clip(torch.as_tensor(controls, dtype=torch.float64).reshape(self.horizon, -1))
        with torch.no_grad():
            states, cost = self.rollout(x0, controls)
        result = ILQRResult(states, controls, [float(cost)], [states])
        mu, delta = self.mu_init, 1.0
        for _ in range(iterations):
            accepted = False
            while not accepted:
                gains = self.backward_pass(states, controls, mu)
                if gains is None:  # Q_uu not positive definite: raise μ and retry
                    delta = max(self.mu_factor, delta * self.mu_factor)
                    mu = max(self.mu_min, mu * delta)
                    if mu > self.mu_max:
                        return result
                    continue
                k, K, d1, d2 = gains
                # the step is (numerically) zero: a fixed point, i.e. a KKT point of the control-limited problem
                step = float((k.abs() / (controls.abs() + 1)).amax(dim=1).mean())
                if step < self.tolerance:
                    result.converged = True
                    return result
                with torch.no_grad():
                    for alpha in self.alphas:
                        new_states, new_controls, new_cost = self.forward_pass(x0, states, controls, k, K, alpha)
                        expected = -(alpha * d1 + alpha**2 * d2)
                        actual = float(cost - new_cost)
                        if actual > 0 and (expected <= 0 or actual / expected > 1e-4):
                            accepted = True
                            break
                if not accepted:  # no step helps at this μ: a more conservative (more regularised) step
                    delta = max(self.mu_factor, delta * self.mu_factor)
                    mu = max(self.mu_min, mu * delta)
                    if mu > self.mu_max:
                        return result
            delta = min(1.0 / self.mu_factor, delta / self.mu_factor)
            mu = mu * delta if mu * delta > self.mu_min else 0.0
            relative = (float(cost) - float(new_cost)) / max(abs(float(cost)), 1e-12)
            states, controls, cost = new_states, new_controls, new_cost
            result.states, result.controls = states, controls
            result.costs.append(float(cost))
            result.trajectories.append(states)
            result.iterations += 1
            if relative < self.tolerance:
                result.converged = True
                break
        return result
