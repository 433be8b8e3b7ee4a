"""Two-ant sumo: a PettingZoo parallel environment on MuJoCo. Two copies of Gymnasium's MIT-licensed
ant are placed facing each other in a ring with ``mujoco.MjSpec``; RoboSumo's rules: ring radius
2.0, a win when the opponent leaves the ring or falls, a draw at 500 steps, frame skip 5; dense
shaping early (weighted by ``shaping_weight``, which a trainer anneals) and +2000 / -2000 / -1000
for a win / loss / draw."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; MuJoCo reads it on import
RING_RADIUS, MAX_STEPS, FRAME_SKIP = 2.0, 500, 5
WIN, LOSE, DRAW = 2000.0, -2000.0, -1000.0
FALL_HEIGHT = 0.3  # a torso this low has fallen (a standing ant's is 0.55-0.75)
START_X = 1.0  # the ants start at (-1, 0) and (1, 0), facing each other
OBS_DIM = 40
OTHER = {"ant0": "ant1", "ant1": "ant0"}  # each side's opponent


def ant_xml() -> Path:
    import gymnasium

    return Path(gymnasium.__file__).parent / "envs" / "mujoco" / "assets" / "ant.xml"


def build_model():
    """The arena: floor, the ring (a flat disc, for the eye), two ants. Each ant collides with the
    floor and the other ant, never with itself (contact bits 2 and 4)."""
    import mujoco

    world = mujoco.MjSpec()
    world.option.timestep = 0.01
    world.option.integrator = mujoco.mjtIntegrator.mjINT_RK4
    world.worldbody.add_light(pos=[0, 0, 4], dir=[0, 0, -1])
    world.worldbody.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[5, 5, 0.1],
                             rgba=[0.8, 0.9, 0.8, 1], contype=1, conaffinity=1)
    world.worldbody.add_geom(name="ring", type=mujoco.mjtGeom.mjGEOM_CYLINDER,
                             size=[RING_RADIUS, 0.005, 0], pos=[0, 0, 0.005],
                             rgba=[0.85, 0.45, 0.35, 1], contype=0, conaffinity=0)
    world.worldbody.add_camera(name="overview", pos=[0, -5.5, 4.0], xyaxes=[1, 0, 0, 0, 0.6, 0.8])
    colors = ([0.2, 0.4, 0.9, 1], [0.9, 0.3, 0.2, 1])
    for i, (x, yaw) in enumerate([(-START_X, 0.0), (START_X, 180.0)]):
        ant = mujoco.MjSpec.from_file(str(ant_xml()))
        half = np.radians(yaw) / 2
        frame = world.worldbody.add_frame(pos=[x, 0, 0], quat=[np.cos(half), 0, 0, np.sin(half)])
        frame.attach_body(ant.body("torso"), f"ant{i}/", "")
    for geom in world.geoms:
        for i in range(2):
            if geom.name.startswith(f"ant{i}/"):
                geom.contype, geom.conaffinity = 2 << i, 1 | (2 << (1 - i))
                geom.rgba = colors[i]
    return world.compile()


class SumoEnv(ParallelEnv):
    metadata = {"name": "sumo_ants_v0", "render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode: str | None = None, shaping_weight: float = 1.0,
                 max_steps: int = MAX_STEPS) -> None:
        import mujoco

        self._mj = mujoco
        self.model = build_model()
        self.data = mujoco.MjData(self.model)
        self.render_mode, self.shaping_weight, self.max_steps = render_mode, shaping_weight, max_steps
        self.possible_agents = ["ant0", "ant1"]
        self._observation_space = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self._action_space = spaces.Box(-1.0, 1.0, (8,), np.float32)
        self.agents: list[str] = []
        self._renderer = None
        self._rng = np.random.default_rng()
        self._index = {}
        for i, agent in enumerate(self.possible_agents):
            joints = [j for j in range(self.model.njnt)
                      if self.model.joint(j).name.startswith(f"ant{i}/")]
            root = self.model.joint(f"ant{i}/root")
            actuators = [a for a in range(self.model.nu)
                         if self.model.actuator_trnid[a, 0] in joints]
            self._index[agent] = {
                "qpos": slice(root.qposadr[0], root.qposadr[0] + 15),
                "qvel": slice(root.dofadr[0], root.dofadr[0] + 14),
                "ctrl": np.array(actuators), "torso": self.model.body(f"ant{i}/torso").id}
        self._torso = {a: self._index[a]["torso"] for a in self.possible_agents}
        self.init_qpos, self.init_qvel = self.data.qpos.copy(), self.data.qvel.copy()
        for agent in self.possible_agents:  # the ant's own standing pose (its init_qpos legs)
            legs = self._index[agent]["qpos"].start + 7
            self.init_qpos[legs:legs + 8] = [0.0, 1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0]

    def observation_space(self, agent: str) -> spaces.Box:
        return self._observation_space  # the same object every call, as PettingZoo expects

    def action_space(self, agent: str) -> spaces.Box:
        return self._action_space

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.steps = 0
        qpos = self.init_qpos + self._rng.uniform(-0.1, 0.1, self.model.nq)
        qvel = self.init_qvel + 0.1 * self._rng.standard_normal(self.model.nv)
        for agent in self.agents:  # keep each torso upright and at its start
            q = self._index[agent]["qpos"]
            qpos[q.start:q.start + 7] = self.init_qpos[q.start:q.start + 7]
        self.data.qpos[:], self.data.qvel[:] = qpos, qvel
        self.data.ctrl[:] = 0
        self._mj.mj_forward(self.model, self.data)
        self._last = self._measures()
        return {a: self._observe(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions: dict):
        for agent in self.agents:
            action = np.clip(np.asarray(actions[agent], dtype=np.float64), -1, 1)
            self.data.ctrl[self._index[agent]["ctrl"]] = action
        self._mj.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        self.steps += 1
        now = self._measures()
        out = {a: (now["radius"][a] > RING_RADIUS or now["height"][a] < FALL_HEIGHT
                   or now["upright"][a] < 0) for a in self.agents}
        rewards = {}
        for agent, other in OTHER.items():
            toward = self._last["distance"] - now["distance"]
            push = now["radius"][other] - self._last["radius"][other]
            center = self._last["radius"][agent] - now["radius"][agent]
            ctrl = 0.01 * float(np.square(actions[agent]).sum())
            rewards[agent] = self.shaping_weight * (10.0 * (toward + push + center) - ctrl)
        self._last = now
        done = any(out.values())
        truncated = not done and self.steps >= self.max_steps
        infos = {a: {} for a in self.agents}
        if done or truncated:
            for agent, other in OTHER.items():
                if truncated or (out[agent] and out[other]):
                    outcome, bonus = "draw", DRAW
                elif out[other]:
                    outcome, bonus = "win", WIN
                else:
                    outcome, bonus = "lose", LOSE
                rewards[agent] += bonus
                infos[agent] = {"outcome": outcome, "steps": self.steps}
        observations = {a: self._observe(a) for a in self.agents}
        terminations = {a: done for a in self.agents}
        truncations = {a: truncated for a in self.agents}
        if done or truncated:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def _measures(self) -> dict:
        xpos, xmat, torso = self.data.xpos, self.data.xmat, self._torso
        return {"radius": {a: float(np.linalg.norm(xpos[b][:2])) for a, b in torso.items()},
                "height": {a: float(xpos[b][2]) for a, b in torso.items()},
                "upright": {a: float(xmat[b][8]) for a, b in torso.items()},  # body z . world z
                "distance": float(np.linalg.norm(xpos[torso["ant0"]][:2]
                                                 - xpos[torso["ant1"]][:2]))}

    def _observe(self, agent: str) -> np.ndarray:
        """Reads ``self._last`` for the ring distances: call after ``_measures`` is stored."""
        other = OTHER[agent]
        mine, theirs = self._index[agent], self._index[other]
        qpos, qvel = self.data.qpos[mine["qpos"]], self.data.qvel[mine["qvel"]]
        own = self.data.xpos[mine["torso"]]
        opponent = self.data.xpos[theirs["torso"]]
        opponent_vel = self.data.qvel[theirs["qvel"]][:6]
        edge = [RING_RADIUS - self._last["radius"][agent], RING_RADIUS - self._last["radius"][other]]
        obs = np.concatenate([own, qpos[3:7], qpos[7:15], qvel, opponent - own, opponent_vel, edge])
        return obs.astype(np.float32)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = self._mj.Renderer(self.model, 360, 480)
        self._renderer.update_scene(self.data, camera="overview")
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def parallel_env(**kwargs) -> SumoEnv:
    return SumoEnv(**kwargs)
