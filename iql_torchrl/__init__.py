"""iql_torchrl: Implicit Q-Learning for TorchRL, faithful to the paper and lean."""
from iql_torchrl.data import OfflineDataMetadata, load_minari_dataset, make_offline_buffer
from iql_torchrl.datasets import DEFAULT_DATASET, ensure_dataset
from iql_torchrl.objectives.discrete import DiscreteIQLLoss
from iql_torchrl.objectives.equations import awr_weight, bellman_target, expectile_loss
from iql_torchrl.objectives.loss import IQLLoss
from iql_torchrl.objectives.networks import make_actor, make_iql_networks, make_qvalue_networks, make_value_network
from iql_torchrl.step.eager_check import StepMismatch
from iql_torchrl.step.update import IQLUpdate

__version__ = "0.1.0"

__all__ = [
    "IQLLoss",
    "DiscreteIQLLoss",
    "expectile_loss",
    "bellman_target",
    "awr_weight",
    "make_actor",
    "make_iql_networks",
    "make_qvalue_networks",
    "make_value_network",
    "IQLUpdate",
    "StepMismatch",
    "load_minari_dataset",
    "make_offline_buffer",
    "OfflineDataMetadata",
    "DEFAULT_DATASET",
    "ensure_dataset",
    "__version__",
]
