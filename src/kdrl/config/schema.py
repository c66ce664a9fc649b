"""The configuration tree: the single source of defaults and of their documentation.

Each field carries its documentation as the string literal that follows it; `kdrl.config.docs`
reads those strings (for error messages and for ``docs/config.md``), so every field must have
one. Names in the ``teacher`` block follow the reference system (AReaL) so its users feel at home.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["float32", "bfloat16", "float16"]
KDEstimator = Literal["pg", "k2", "seed_k1", "forward_kl", "reverse_kl", "jsd"]


@dataclass
class StudentConfig:
    """The model being trained."""

    path: str = ""
    """Hugging Face model folder or hub name, loaded with `from_pretrained`."""
    dtype: DType = "float32"
    """Parameter and compute dtype of the student."""


@dataclass
class RolloutConfig:
    """How the student samples its own answers (on-policy)."""

    n_samples: int = 4
    """Completions sampled per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; the student's log-probs in the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    max_new_tokens: int = 256
    """Longest completion; longer ones are cut and flagged as truncated."""


@dataclass
class MicroBatchSpec:
    """Token-budget micro-batching (the reference's `mb_spec`)."""

    max_tokens_per_mb: int = 16384
    """Most tokens (prompt + response, all sequences) in one forward pass."""


@dataclass
class TeacherConfig:
    """The frozen teacher and the distillation term of the loss."""

    path: str = ""
    """Hugging Face model folder or hub name of the teacher; empty means no teacher (pure RL)."""
    dtype: DType = "bfloat16"
    """Dtype the teacher is loaded and run in."""
    temperature: float = 1.0
    """Temperature of the teacher's log-probs. Explicit: never inherited from the rollout."""
    rl_loss_weight: float = 1.0
    """Weight of the GRPO loss; 0 means pure distillation."""
    distill_loss_weight: float = 0.005
    """Weight of the distillation loss; 0 means pure RL."""
    kd_estimator: KDEstimator = "pg"
    """Distillation loss. Sampled-token estimators (need the teacher's log-prob of each sampled
    token): `pg` importance-sampled reverse-KL policy gradient, `k2` squared log-ratio,
    `seed_k1` the reference's joint term (zero expected gradient; kept to reproduce it).
    Full-distribution divergences (need teacher logits, full or top-k): `forward_kl`,
    `reverse_kl`, `jsd`. See docs/math.md."""
    kd_discount: float = 0.0
    """Reward-to-go discount of `pg`: 0 is per-token reverse KL, 1 sequence-level reverse KL."""
    kd_eps_clip: float | None = None
    """PPO clip range for the `pg` ratio; null leaves it unclipped, as the reference does."""
    jsd_beta: float = 0.5
    """Generalized JSD mixture weight for `jsd`: 0 is forward KL, 1 reverse KL (exact)."""
    top_k: int | None = None
    """Teacher top-k (plus one tail bucket) for full-distribution divergences; null is full."""
    mb_spec: MicroBatchSpec = field(default_factory=MicroBatchSpec)
    """Micro-batching of teacher scoring."""


@dataclass
class GRPOConfig:
    """Group-relative policy optimisation on the task reward."""

    reward_scaling: float = 1.0
    """Rewards become `(reward + reward_bias) * reward_scaling` before normalisation."""
    reward_bias: float = 0.0
    """Added to every reward before scaling."""
    adv_std_norm: bool = True
    """Divide advantages by the group's reward standard deviation (GRPO); false keeps the mean
    baseline only (Dr. GRPO style)."""
    eps_clip: float = 0.2
    """PPO clip range: the ratio is clipped to [1 - eps_clip, 1 + eps_clip_higher]."""
    eps_clip_higher: float | None = None
    """Upper clip range (decoupled clipping); null uses eps_clip."""
    c_clip: float | None = None
    """Dual-clip constant (> 1) bounding the loss of negative-advantage tokens; null disables."""


@dataclass
class Config:
    """A kdrl run."""

    seed: int = 1
    """Seed of every random number generator."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The model being trained."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """On-policy sampling."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher and the distillation loss."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The RL loss."""
