"""IQLLoss with your own actor in a plain TorchRL script: replay buffer, Adam, SoftUpdate."""
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from iql_torchrl import IQLLoss, make_qvalue_networks, make_value_network

obs_dim, act_dim, n = 3, 2, 1024
net = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 2 * act_dim), NormalParamExtractor())
actor = ProbabilisticActor(
    TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
    in_keys=["loc", "scale"], distribution_class=TanhNormal,
)
loss = IQLLoss(actor, make_qvalue_networks(obs_dim, act_dim), make_value_network(obs_dim))
optimizer = torch.optim.Adam(loss.parameters(), lr=3e-4)
target_update = SoftUpdate(loss, tau=0.005)

buffer = ReplayBuffer(storage=LazyTensorStorage(n), batch_size=256)
buffer.extend(TensorDict({  # your transitions go here
    "observation": torch.randn(n, obs_dim), "action": torch.rand(n, act_dim) * 1.8 - 0.9,
    ("next", "observation"): torch.randn(n, obs_dim), ("next", "reward"): torch.randn(n, 1),
    ("next", "done"): torch.zeros(n, 1, dtype=torch.bool),
    ("next", "terminated"): torch.zeros(n, 1, dtype=torch.bool)}, batch_size=[n]))

for step in range(100):
    losses = loss(buffer.sample())
    (losses["loss_value"] + losses["loss_qvalue"] + losses["loss_actor"]).backward()
    optimizer.step()
    optimizer.zero_grad()
    target_update.step()
print({k: round(v.item(), 4) for k, v in losses.items() if k.startswith("loss_")})
