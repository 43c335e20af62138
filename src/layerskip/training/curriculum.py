"""Early-exit curricula C(t, l): which exits contribute to the loss at step t. The last layer always does.

A curriculum is stateful (it counts the steps it has been advanced) and checkpointable: its
`state_dict` goes into the training state, so a resumed run continues the pattern where it stopped.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from layerskip.errors import LayerSkipError


class Curriculum:
    """Base class: subclasses say which exits are enabled at the current step."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.current_step = 0

    def enabled_exits(self) -> torch.Tensor:
        """Bool [L]: True for the exits in the loss at the current step (always including the last layer)."""
        enabled = self._enabled()
        enabled[-1] = True
        return enabled

    def _enabled(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> None:
        self.current_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "step": self.current_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != type(self).__name__:
            raise ValueError(f"a {state['kind']} curriculum state cannot be loaded into a {type(self).__name__}")
        self.current_step = int(state["step"])


class AllExits(Curriculum):
    """Every layer is an exit at every step."""

    def _enabled(self) -> torch.Tensor:
        return torch.ones(self.num_layers, dtype=torch.bool)


class LastExit(Curriculum):
    """Only the last layer: plain language-model training (layer dropout may still apply)."""

    def _enabled(self) -> torch.Tensor:
        return torch.zeros(self.num_layers, dtype=torch.bool)


class Rotational(Curriculum):
    """Every R-th layer, shifted by one each step: at step t, layer l is an exit when (l + t) % R == R - 1.

    At step 0 that is layers R-1, 2R-1, ... (the exits after R, 2R, ... layers); every layer has been an
    exit once after R steps, at about L/R exits (plus the last layer) per step.
    """

    def __init__(self, num_layers: int, rotation: int):
        super().__init__(num_layers)
        self.rotation = rotation

    def _enabled(self) -> torch.Tensor:
        layers = torch.arange(self.num_layers)
        return (layers + self.current_step) % self.rotation == self.rotation - 1


class Gradual(Curriculum):
    """Exits enabled from the last layer downwards: one more every `interval` steps (T / (2 L) in the paper)."""

    def __init__(self, num_layers: int, interval: int):
        super().__init__(num_layers)
        self.interval = max(1, interval)

    def _enabled(self) -> torch.Tensor:
        count = min(self.num_layers, 1 + self.current_step // self.interval)
        return torch.arange(self.num_layers) >= self.num_layers - count


class FixedExits(Curriculum):
    """The same exits at every step: for a model meant to draft from one or a few known exit layers."""

    def __init__(self, num_layers: int, exit_layers: Sequence[int]):
        super().__init__(num_layers)
        outside = [e for e in exit_layers if not 1 <= e < num_layers]
        if outside:
            raise LayerSkipError(f"config key 'early_exit.exits': exit layer {outside[0]} is outside "
                                 f"[1, {num_layers - 1}] for this {num_layers}-layer model")
        self.exit_layers = sorted(set(exit_layers))

    def _enabled(self) -> torch.Tensor:
        enabled = torch.zeros(self.num_layers, dtype=torch.bool)
        enabled[[e - 1 for e in self.exit_layers]] = True  # the exit after E layers is layer index E - 1
        return enabled


def make_curriculum(name: str, num_layers: int, *, rotation: int = 8, gradual_interval: int = 0,
                    total_steps: int = 1, exits: Sequence[int] = ()) -> Curriculum:
    """The named curriculum; gradual's interval defaults to total_steps / (2 L)."""
    if name == "rotational":
        return Rotational(num_layers, rotation)
    if name == "gradual":
        return Gradual(num_layers, gradual_interval or total_steps // (2 * num_layers))
    if name == "all":
        return AllExits(num_layers)
    if name == "last":
        return LastExit(num_layers)
    if name == "fixed":
        return FixedExits(num_layers, exits)
    raise ValueError(f"unknown curriculum '{name}'")
