"""Scripted policies used to build the local datasets.

Every policy maps one (unbatched, numpy) environment observation to one action in
the environment's own action bounds, so it can drive ``env.step`` directly.

* :class:`PendulumExpert` (``Pendulum-v1``): energy-pumping swing-up, then an LQR
  balance controller computed on the linearised pendulum dynamics.
* :class:`InvertedPendulumExpert` (``InvertedPendulum-v5``): LQR on a
  finite-difference linearisation of the MuJoCo model around the upright state.
* :class:`ReacherExpert` (``Reacher-v5``): analytic inverse kinematics of the
  two-link arm to the target, then a joint-space PD controller.
* :class:`CartPoleExpert` (``CartPole-v1``, 2 actions): push towards the side the pole
  is falling to, judged by a linear feedback of the pole angle and angular velocity
  (plus a little cart position and velocity, to stay centred); with a ``bias``, the
  drifting balancer of the CartPole ``mixed`` dataset (the pole stays up, the cart runs off).
* :class:`MountainCarExpert` (``MountainCar-v0``, 3 actions): push in the direction the
  car moves, pumping energy into its swing until it climbs the right hill.
* :class:`RandomPolicy`: uniform actions over the action box, or uniform action indices.
* :class:`DegradedPolicy`: an expert with Gaussian action noise that, at each
  step, is replaced by a uniform random action with some probability (the
  ``medium`` datasets; discrete actions get no noise, only the random replacements).
* :class:`MirroredPolicy`: a discrete expert's action mirrored, index ``n - 1 - a``
  (push left where the expert pushes right): a systematically wrong policy, for the
  discrete ``mixed`` datasets.

Random and degraded policies draw from a ``numpy.random.Generator`` they are
given, so an episode is reproduced exactly from its seed.
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np

__all__ = [
    "CartPoleExpert",
    "DegradedPolicy",
    "InvertedPendulumExpert",
    "MirroredPolicy",
    "MountainCarExpert",
    "PendulumExpert",
    "RandomPolicy",
    "ReacherExpert",
    "discrete_lqr_gain",
    "make_expert",
]


def discrete_lqr_gain(
    A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, iterations: int = 5000
) -> np.ndarray:
    """Infinite-horizon discrete LQR gain ``K`` (control ``u = -K x``).

    Solves the discrete algebraic Riccati equation by fixed-point iteration, which
    is plenty for the 2- and 4-dimensional systems used here.
    """
    P = Q.copy()
    for _ in range(iterations):
        gain = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P_next = Q + A.T @ P @ (A - B @ gain)
        if np.allclose(P_next, P, rtol=1e-12, atol=1e-12):
            P = P_next
            break
        P = P_next
    return np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)


class PendulumExpert:
    """Swing-up and balance for ``Pendulum-v1`` (torque limit ±2).

    The pendulum obeys ``theta_ddot = 15 sin(theta) + 3 u`` (g=10, m=l=1), integrated by
    semi-implicit Euler with ``dt = 0.05``; ``theta = 0`` is upright. Its energy
    ``E = theta_dot**2 / 2 + 15 (cos(theta) - 1)`` is 0 at the upright rest point and changes
    as ``dE/dt = 3 u theta_dot``, so ``u = k (E_target - E) theta_dot`` pumps energy in until
    the pendulum swings up. Near the top, a discrete LQR controller (costs matching the
    environment's reward: ``theta**2 + 0.1 theta_dot**2 + 0.001 u**2``) balances it.
    """

    max_torque = 2.0

    def __init__(self, balance_angle: float = 0.7, pump_gain: float = 0.5):
        self.balance_angle = balance_angle
        self.pump_gain = pump_gain
        dt, gravity_term, torque_term = 0.05, 15.0, 3.0
        A = np.array([[1.0 + gravity_term * dt * dt, dt], [gravity_term * dt, 1.0]])
        B = np.array([[torque_term * dt * dt], [torque_term * dt]])
        self.gain = discrete_lqr_gain(A, B, np.diag([1.0, 0.1]), np.array([[0.001]]))[0]

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        cos_theta, sin_theta, theta_dot = (float(x) for x in observation[:3])
        theta = np.arctan2(sin_theta, cos_theta)
        if abs(theta) < self.balance_angle:
            torque = -float(self.gain @ np.array([theta, theta_dot]))
        else:
            energy = 0.5 * theta_dot**2 + 15.0 * (cos_theta - 1.0)
            if abs(theta_dot) < 1e-3:  # at rest: kick to start the swing
                torque = self.max_torque
            else:
                torque = self.pump_gain * (0.0 - energy) * theta_dot
        return np.array([np.clip(torque, -self.max_torque, self.max_torque)], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _inverted_pendulum_lqr_gain(env_id: str) -> np.ndarray:
    """LQR gain from a central finite-difference linearisation of one env step."""
    env = gym.make(env_id)
    sim = env.unwrapped
    sim.reset(seed=0)
    nq = sim.model.nq

    def step(state: np.ndarray, force: float) -> np.ndarray:
        sim.set_state(state[:nq].copy(), state[nq:].copy())
        sim.do_simulation(np.array([force]), sim.frame_skip)
        return np.concatenate([sim.data.qpos, sim.data.qvel]).copy()

    upright = np.zeros(2 * nq)
    eps = 1e-5
    A = np.zeros((2 * nq, 2 * nq))
    for i in range(2 * nq):
        delta = np.zeros(2 * nq)
        delta[i] = eps
        A[:, i] = (step(upright + delta, 0.0) - step(upright - delta, 0.0)) / (2 * eps)
    B = ((step(upright, eps) - step(upright, -eps)) / (2 * eps))[:, None]
    env.close()
    Q = np.diag([1.0, 10.0, 0.1, 0.1])  # state = [cart position, pole angle, velocities]
    return discrete_lqr_gain(A, B, Q, np.array([[0.1]]))[0]


class InvertedPendulumExpert:
    """LQR balance for ``InvertedPendulum-v5`` (force limit ±3).

    The observation is the full state ``[cart position, pole angle, cart velocity,
    pole angular velocity]``; the gain comes from linearising the MuJoCo model
    (one environment step, two physics substeps) around the upright state by
    central finite differences.
    """

    max_force = 3.0

    def __init__(self, env_id: str = "InvertedPendulum-v5"):
        self.gain = _inverted_pendulum_lqr_gain(env_id)

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        force = -float(self.gain @ np.asarray(observation, dtype=np.float64)[:4])
        return np.array([np.clip(force, -self.max_force, self.max_force)], dtype=np.float32)


class ReacherExpert:
    """Inverse kinematics plus joint PD control for ``Reacher-v5`` (torques ±1).

    The arm has two links of lengths 0.1 and 0.11 (shoulder to elbow, elbow to
    fingertip). The target joint angles come from the closed-form two-link inverse
    kinematics, choosing the elbow branch closer to the current elbow angle; the
    torque is ``kp * angle_error - kd * joint_velocity``, clipped to ±1.
    """

    link_lengths = (0.1, 0.11)

    def __init__(self, kp: float = 0.3, kd: float = 0.06):
        self.kp = kp
        self.kd = kd

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        observation = np.asarray(observation, dtype=np.float64)
        cos_q, sin_q = observation[0:2], observation[2:4]
        joint_angles = np.arctan2(sin_q, cos_q)
        target = observation[4:6]
        joint_velocities = observation[6:8]
        l1, l2 = self.link_lengths
        distance = np.clip(np.linalg.norm(target), abs(l1 - l2) + 1e-6, l1 + l2 - 1e-6)
        cos_elbow = np.clip((distance**2 - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
        best_error = None
        for elbow in (np.arccos(cos_elbow), -np.arccos(cos_elbow)):
            shoulder = np.arctan2(target[1], target[0]) - np.arctan2(
                l2 * np.sin(elbow), l1 + l2 * np.cos(elbow)
            )
            error = _wrap_angle(np.array([shoulder, elbow]) - joint_angles)
            if best_error is None or abs(error[1]) < abs(best_error[1]):
                best_error = error
        torque = self.kp * best_error - self.kd * joint_velocities
        return np.clip(torque, -1.0, 1.0).astype(np.float32)


def _wrap_angle(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class CartPoleExpert:
    """Balance for ``CartPole-v1``: action 1 (push right) when ``theta + 0.3 theta_dot + 0.01 x
    + 0.1 x_dot > 0``, else 0.

    The pole falls towards positive ``theta``; pushing the cart under it brings it back. The
    angular-velocity term damps the swing and the small cart terms keep the cart from drifting
    out of the track. It holds the pole for the full 500 steps from every start we tried.

    With a ``bias`` it is the *drifting* balancer of the discrete ``mixed`` dataset: it pushes
    right when ``theta + 0.3 theta_dot + 0.01 x + 0.1 x_dot + bias > 0``, which still holds the
    pole up but lets the cart run off the track (``bias=0.2``: off the left end after about 110
    steps, 105–113 over 20 starts, acting unlike the expert in about 45% of its steps;
    ``bias=-0.2`` off the right end).
    """

    weights = np.array([0.01, 0.1, 1.0, 0.3])

    def __init__(self, bias: float = 0.0):
        self.bias = bias

    def __call__(self, observation: np.ndarray) -> np.int64:
        return np.int64(float(self.weights @ np.asarray(observation, dtype=np.float64)[:4]) + self.bias > 0)


class MountainCarExpert:
    """``MountainCar-v0``: push in the direction of the car's velocity (action 2 right, 0 left).

    Pushing along the velocity adds energy at every step, so the car's swing grows until it
    reaches the flag on the right hill (about 120 steps from the usual starts; the time limit is 200).
    """

    def __call__(self, observation: np.ndarray) -> np.int64:
        return np.int64(2 if float(observation[1]) >= 0 else 0)


class MirroredPolicy:
    """A discrete expert mirrored: action ``num_actions - 1 - expert(observation)``.

    For CartPole it pushes the cart away from under the falling pole (the pole falls in about
    9 steps); for MountainCar it pushes against the velocity (the car stays in the valley).
    """

    def __init__(self, expert, num_actions: int):
        self.expert = expert
        self.num_actions = num_actions

    def __call__(self, observation: np.ndarray) -> np.int64:
        return np.int64(self.num_actions - 1 - int(self.expert(observation)))


class RandomPolicy:
    """Uniform random actions over a Box action space, or uniform indices of a Discrete one, drawn from ``rng``."""

    def __init__(self, action_space: gym.spaces.Box | gym.spaces.Discrete, rng: np.random.Generator):
        self.num_actions = int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else None
        if self.num_actions is None:
            self.low = np.asarray(action_space.low, dtype=np.float64)
            self.high = np.asarray(action_space.high, dtype=np.float64)
        self.rng = rng

    def __call__(self, observation: np.ndarray):
        if self.num_actions is not None:
            return np.int64(self.rng.integers(self.num_actions))
        return self.rng.uniform(self.low, self.high).astype(np.float32)


class DegradedPolicy:
    """An expert made worse: Gaussian noise on its actions, sometimes a random action.

    At every step, with probability ``random_action_prob`` the action is uniform over
    the box (a uniform index for discrete actions); otherwise it is the expert's action plus
    Gaussian noise of standard deviation ``noise_std`` times the half-range of the box, clipped
    to the box (discrete actions: the expert's action).
    """

    def __init__(
        self,
        expert,
        action_space: gym.spaces.Box | gym.spaces.Discrete,
        rng: np.random.Generator,
        noise_std: float,
        random_action_prob: float,
    ):
        self.expert = expert
        self.random = RandomPolicy(action_space, rng)
        self.rng = rng
        self.noise_std = noise_std
        self.random_action_prob = random_action_prob

    def __call__(self, observation: np.ndarray):
        if self.rng.random() < self.random_action_prob:
            return self.random(observation)
        if self.random.num_actions is not None:
            return np.int64(self.expert(observation))
        low, high = self.random.low, self.random.high
        noise = self.rng.normal(size=low.shape) * self.noise_std * (high - low) / 2
        action = np.asarray(self.expert(observation), dtype=np.float64) + noise
        return np.clip(action, low, high).astype(np.float32)


_EXPERTS = {
    "Pendulum-v1": PendulumExpert,
    "InvertedPendulum-v5": InvertedPendulumExpert,
    "Reacher-v5": ReacherExpert,
    "CartPole-v1": CartPoleExpert,
    "MountainCar-v0": MountainCarExpert,
}


def make_expert(env_id: str):
    """The scripted expert for ``env_id`` (a key of the experts table: ``Pendulum-v1``,
    ``InvertedPendulum-v5``, ``Reacher-v5``, ``CartPole-v1``, ``MountainCar-v0``)."""
    try:
        return _EXPERTS[env_id]()
    except KeyError:
        raise ValueError(
            f"No scripted expert for environment {env_id!r}; available: {sorted(_EXPERTS)}"
        ) from None
