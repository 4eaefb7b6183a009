"""Offline data: Minari datasets (or your own transitions) as TorchRL replay buffers.

One job a module, data flowing down the list:

* :mod:`~iql_torchrl.data.metadata` -- :class:`OfflineDataMetadata` (what evaluation, checkpoints
  and exported policies need: env, spaces, transforms) and the one observation flattening;
* :mod:`~iql_torchrl.data.checks` -- non-finite values, discrete indices out of range, Box actions
  outside the env's bounds, each a :class:`DatasetError` naming the field, the episode and a fix;
* :mod:`~iql_torchrl.data.buffer` -- :class:`BufferOptions` and building the buffer: write raw,
  check, compute statistics, transform in place;
* :mod:`~iql_torchrl.data.goals` -- goal-reaching data: the goal in or out of the input, the fixed
  evaluation goal, the maze check;
* :mod:`~iql_torchrl.data.minari` -- :func:`load_minari_dataset`, :func:`read_minari_transitions`;
* :mod:`~iql_torchrl.data.transitions` -- :func:`make_offline_buffer` for your own TensorDict;
* :mod:`~iql_torchrl.data.sampling` -- device-side batches (:func:`sample_indices`).

The buffer is a :class:`torchrl.data.ReplayBuffer` over a :class:`~torchrl.data.LazyTensorStorage`
(in memory or on the training device) or a :class:`~torchrl.data.LazyMemmapStorage` (on disk, for
datasets larger than memory). Every transition carries TorchRL's keys, floats as ``float32``::

    observation                 [N, obs_dim]
    action                      [N, act_dim]  float32 (Box actions)
                                [N]           int64 index (Discrete(n) actions), or
                                [N, n]        float32 one-hot with one_hot_actions=True
    ("next", "observation")     [N, obs_dim]
    ("next", "reward")          [N, 1]
    ("next", "done")            [N, 1]  bool, terminated | truncated
    ("next", "terminated")      [N, 1]  bool
    ("next", "truncated")       [N, 1]  bool
    episode                     [N]     int64, the source episode id

The last transition of an episode has the episode's final observation as its next
observation, whether the episode ended by termination or by truncation.

Dict observations (e.g. Minari's maze datasets: ``achieved_goal``, ``desired_goal``,
``observation``) are flattened into ``observation`` by concatenating the flattened
entries in the order of the observation space's keys (gymnasium sorts them
alphabetically); the order is kept in ``metadata.observation_keys`` and
:meth:`OfflineDataMetadata.observation_from_env` flattens environment observations the
same way at evaluation. Goal-reaching data may leave ``desired_goal`` out of the policy's input, its
rewards then relabelled to the evaluation's fixed goal (:mod:`~iql_torchrl.data.goals`).

Checks, before training can start: NaN/inf in any float field, discrete action indices outside
``[0, n)``, and Box actions past the environment's bounds (by more than ``1e-6`` of the bound's
magnitude) are refused with the count and fraction per episode range; ``clip_actions=True``
(``--clip-actions``) clips such actions into the bounds instead, with a warning.

Transforms are applied once, when the buffer is built, never at sampling time.
Defaults (fields of :class:`BufferOptions`):

* Box actions scaled from the environment's bounds to ``[-1, 1]`` (``scale_actions=True``;
  boxes already at ``±1`` are left untouched), then clipped to ``±(1 - 1e-5)``
  (``action_clip_eps=1e-5``) so that ``atanh``/tanh-Gaussian log-probabilities stay finite;
  evaluation maps policy actions back with :meth:`OfflineDataMetadata.action_to_env`;
  discrete actions are never transformed;
* rewards unchanged (``reward_transform="none"``); ``"locomotion"`` multiplies them by
  ``1000 / (max episode return - min episode return)`` (the IQL paper's MuJoCo setting) and
  ``"antmaze"`` subtracts 1 (the paper's AntMaze setting);
* observations not normalised (``normalize_observations=False``); the statistics
  (per-feature mean, and standard deviation + 1e-3, as CORL's IQL) are always computed and stored in the
  metadata, and with ``normalize_observations=True`` they are applied to ``observation`` and
  ``("next", "observation")`` here, by TorchRL's ``ObservationNorm``
  (:meth:`OfflineDataMetadata.observation_norm`, the transform evaluation and online environments
  apply to environment observations); :func:`normalize_stored_observations` applies given statistics
  instead (those a saved run normalised the same data with).

``raw=True`` turns every transform and the bounds check off (observations are still flattened and
cast to ``float32``). The buffer's ``metadata`` attribute (an :class:`OfflineDataMetadata`) holds
what evaluation and checkpoints need; ``metadata.state_dict()`` is a plain, JSON-friendly
dict and :meth:`OfflineDataMetadata.from_state_dict` restores it.
"""

from iql_torchrl.data.buffer import REWARD_TRANSFORMS, BufferOptions, normalize_stored_observations
from iql_torchrl.data.checks import ACTION_BOUND_TOLERANCE, DatasetError
from iql_torchrl.data.metadata import ACTION_CLIP_EPS, OBSERVATION_STD_EPS, OfflineDataMetadata, flatten_observation
from iql_torchrl.data.minari import is_fixed_goal_data, load_minari_dataset, read_minari_transitions, unmet_requirements
from iql_torchrl.data.sampling import buffer_transitions, sample_indices
from iql_torchrl.data.transitions import TRANSITION_KEYS, make_offline_buffer

__all__ = [
    "ACTION_BOUND_TOLERANCE",
    "ACTION_CLIP_EPS",
    "BufferOptions",
    "DatasetError",
    "OBSERVATION_STD_EPS",
    "OfflineDataMetadata",
    "REWARD_TRANSFORMS",
    "TRANSITION_KEYS",
    "buffer_transitions",
    "flatten_observation",
    "is_fixed_goal_data",
    "load_minari_dataset",
    "make_offline_buffer",
    "normalize_stored_observations",
    "read_minari_transitions",
    "sample_indices",
    "unmet_requirements",
]
