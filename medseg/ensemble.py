"""A checkpoint ensemble: several trainings of one network, their outputs averaged."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch

from medseg.bundle import load_checkpoint


class MeanEnsemble(torch.nn.Module):
    """Average the raw outputs (logits, distance maps) of ``members``, which all take the same input.

    Averaging logits rather than probabilities keeps the ensemble a drop-in network: the bundle's
    inferer, test-time augmentation, logit shift and softmax apply to its output as to one network's.
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for member in self.members[1:]:
            out = out + member(x)
        return out / len(self.members)


def load_members(network: torch.nn.Module, paths: Sequence[str | os.PathLike],
                 device: Any = "cpu") -> tuple[torch.nn.Module, list[str]]:
    """``network`` with the weights of ``paths[0]``, or a :class:`MeanEnsemble` of copies loaded from each path,
    and the SHA-256 of each file as loaded (for the records of a run).

    Raises:
        CheckpointError: a path is missing, unreadable, or holds weights of another network.
    """
    if len(paths) == 1:
        return network, [load_checkpoint(network, paths[0], device)]
    members, digests = [], []
    for path in paths:
        member = copy.deepcopy(network)
        digests.append(load_checkpoint(member, path, device))
        members.append(member)
    return MeanEnsemble(members), digests
