"""Random transitions with TorchRL's keys, for tests that need data but not a dataset."""
import torch
from tensordict import TensorDict


def random_transitions(n: int, obs_dim: int, action_dim: int, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(n, obs_dim, generator=g),
            "action": torch.rand(n, action_dim, generator=g) * 2 - 1,
            ("next", "observation"): torch.randn(n, obs_dim, generator=g),
            ("next", "reward"): torch.randn(n, 1, generator=g),
            ("next", "terminated"): torch.rand(n, 1, generator=g) < 0.05,
            ("next", "done"): torch.rand(n, 1, generator=g) < 0.05,
        },
        [n],
    )
