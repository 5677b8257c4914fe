"""The learned dynamics model P of model-based ML³ (paper, algorithm 3 and appendix B).

P is a small ensemble of MLPs on the normalised (s, a) that predict the normalised state change Δs = s' − s;
the prediction is the ensemble mean. Its weights are plain tensors (no ``nn.Module``), so that a rollout
``s_{t+1} = s_t + P(s_t, a_t)`` is a pure function that ``torch.func`` can ``vmap`` over tasks and differentiate
with respect to the actions (hence the policy parameters θ) while P itself stays fixed.

Fitting (``fit``) draws every minibatch and every initial weight from the caller's generator, and the whole model
(weights, normalisation and its transition dataset) round-trips through ``state_tensors``/``load_state_tensors``,
so a meta-training run that refits P resumes bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class DynamicsModel:
    """An ensemble of ``members`` MLPs ``state_dim + action_dim → hidden → state_dim`` (tanh) predicting Δs."""

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        hidden: tuple[int, ...] = (64, 64),
        members: int = 1,
        max_transitions: int = 50_000,
    ):
        self.state_dim, self.action_dim = state_dim, action_dim
        self.hidden, self.members, self.max_transitions = tuple(hidden), members, max_transitions
        self.weights: list[Tensor] = []  # W0, b0, W1, b1, …: W [members, in, out], b [members, out]
        self.in_mean = torch.zeros(state_dim + action_dim)
        self.in_std = torch.ones(state_dim + action_dim)
        self.out_mean = torch.zeros(state_dim)
        self.out_std = torch.ones(state_dim)
        self.inputs = torch.zeros(0, state_dim + action_dim)  # the transition dataset: (s, a) …
        self.targets = torch.zeros(0, state_dim)  # … and Δs

    @property
    def fitted(self) -> bool:
        return bool(self.weights)

    # -- prediction (pure, vmap-able) ----------------------------------------------------------------------
    def delta(self, state: Tensor, action: Tensor) -> Tensor:
        """The predicted Δs for ``state [..., S]`` and ``action [..., A]`` (the ensemble mean)."""
        x = (torch.cat([state, action], dim=-1) - self.in_mean) / self.in_std
        h = x.unsqueeze(-2).expand(*x.shape[:-1], self.members, x.shape[-1])  # [..., members, in]
        layers = len(self.weights) // 2
        for i in range(layers):
            w, b = self.weights[2 * i], self.weights[2 * i + 1]
            h = torch.einsum("...mi,mio->...mo", h, w) + b
            if i < layers - 1:
                h = torch.tanh(h)
        return h.mean(dim=-2) * self.out_std + self.out_mean

    def step(self, state: Tensor, action: Tensor) -> Tensor:
        return state + self.delta(state, action)

    # -- data and fitting ----------------------------------------------------------------------------------
    def add(self, states: Tensor, actions: Tensor) -> None:
        """Add the transitions of trajectories ``states [n, T + 1, S]`` under ``actions [n, T, A]``; the dataset
        keeps the latest ``max_transitions`` (older rollouts of early policies drop out first)."""
        x = torch.cat([states[:, :-1], actions], dim=-1).reshape(-1, self.state_dim + self.action_dim)
        y = (states[:, 1:] - states[:, :-1]).reshape(-1, self.state_dim)
        self.inputs = torch.cat([self.inputs, x.detach().float().cpu()])[-self.max_transitions :]
        self.targets = torch.cat([self.targets, y.detach().float().cpu()])[-self.max_transitions :]

    def _init_weights(self, generator: torch.Generator) -> None:
        widths = [self.state_dim + self.action_dim, *self.hidden, self.state_dim]
        self.weights = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            bound = 1 / math.sqrt(fan_in)  # PyTorch's default Linear init, drawn from the caller's generator
            self.weights.append((2 * torch.rand(self.members, fan_in, fan_out, generator=generator) - 1) * bound)
            self.weights.append((2 * torch.rand(self.members, fan_out, generator=generator) - 1) * bound)

    @torch.enable_grad()  # fitting needs gradients even when called from an evaluation under no_grad
    def fit(self, generator: torch.Generator, steps: int, batch_size: int = 256, lr: float = 3e-3) -> float:
        """``steps`` Adam steps on the mean squared error of the normalised Δs (warm-started if already fitted);
        each member draws its own minibatches. Returns the final training loss (normalised units)."""
        if len(self.inputs) == 0:
            raise ValueError("the dynamics model has no transitions to fit")
        self.in_mean, self.in_std = self.inputs.mean(0), self.inputs.std(0).clamp_min(1e-6)
        self.out_mean, self.out_std = self.targets.mean(0), self.targets.std(0).clamp_min(1e-6)
        if not self.fitted:
            self._init_weights(generator)
        device = self.weights[0].device
        weights = [w.detach().clone().requires_grad_() for w in self.weights]
        optimizer = torch.optim.Adam(weights, lr=lr)
        x_all = (self.inputs - self.in_mean) / self.in_std
        y_all = (self.targets - self.out_mean) / self.out_std
        loss = torch.zeros(())
        layers = len(weights) // 2
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (self.members, min(batch_size, len(x_all))), generator=generator)
            h, y = x_all[idx].to(device), y_all[idx].to(device)  # [members, batch, …]
            for i in range(layers):
                h = torch.einsum("mbi,mio->mbo", h, weights[2 * i]) + weights[2 * i + 1][:, None]
                if i < layers - 1:
                    h = torch.tanh(h)
            loss = ((h - y) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.weights = [w.detach() for w in weights]
        return float(loss.detach())

    # -- state ---------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"weight{i}": w for i, w in enumerate(self.weights)}
        out.update(
            in_mean=self.in_mean,
            in_std=self.in_std,
            out_mean=self.out_mean,
            out_std=self.out_std,
            inputs=self.inputs,
            targets=self.targets,
        )
        return {k: v.detach().clone() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = {"in_mean", "in_std", "out_mean", "out_std", "inputs", "targets"}
        missing = expected - set(tensors)
        if missing:
            raise ValueError(f"the dynamics model state lacks {sorted(missing)}")
        weights = [tensors[f"weight{i}"] for i in range(sum(k.startswith("weight") for k in tensors))]
        widths = [self.state_dim + self.action_dim, *self.hidden, self.state_dim]
        if weights and [tuple(w.shape) for w in weights[::2]] != [
            (self.members, a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        ]:
            raise ValueError(
                f"the dynamics model state has layers {[tuple(w.shape) for w in weights[::2]]}, "
                f"expected {widths} with {self.members} member(s)"
            )
        self.weights = [w.clone() for w in weights]
        for name in expected:
            setattr(self, name, tensors[name].clone())
