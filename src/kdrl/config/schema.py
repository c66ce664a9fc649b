"""The configuration tree: the single source of defaults and of their documentation.

Each field carries its documentation as the string literal that follows it; `kdrl.config.docs`
reads those strings (for error messages and for ``docs/config.md``), so every field must have
one. Names in the ``teacher`` block follow the reference system (AReaL) so its users feel at home.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["float32", "bfloat16", "float16", "auto"]
KDEstimator = Literal["pg", "k2", "seed_k1", "forward_kl", "reverse_kl", "jsd"]
OverlongPolicy = Literal["error", "skip", "truncate_left"]
LRSchedule = Literal["constant", "linear", "cosine"]
WandbMode = Literal["off", "offline", "online"]
RolloutBackend = Literal["hf", "vllm"]
TeacherBackend = Literal["local", "http", "openai"]
ParallelStrategy = Literal["fsdp", "ddp"]


@dataclass
class StudentConfig:
    """The model being trained."""

    path: str = ""
    """Hugging Face model folder or hub name, loaded with `from_pretrained`."""
    dtype: DType = "float32"
    """Parameter and compute dtype of the student (`auto` as for the teacher; float32 keeps
    AdamW's updates exact)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class VLLMConfig:
    """The in-process vLLM engine of `rollout.backend: vllm`."""

    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM may take (weights + KV cache); the trainer needs the rest."""
    cpu_kvcache_gb: float = 1.0
    """KV cache size in GiB on a CPU (`VLLM_CPU_KVCACHE_SPACE`)."""
    max_model_len: int = 0
    """Longest prompt + response the engine accepts; 0 is `data.max_prompt_tokens +
    rollout.max_new_tokens`, capped at the model's `max_position_embeddings`."""
    enforce_eager: bool = True
    """Skip CUDA-graph capture (faster start; set false for long GPU runs)."""


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
    backend: RolloutBackend = "hf"
    """Sampling engine: `hf` (transformers `generate` on the training model) or `vllm` (an
    in-process vLLM engine that receives the new weights after every optimizer step; needs
    `pip install 'kdrl[vllm]'`). Both sample from the same distribution; see docs/scaling.md."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Engine settings for `backend: vllm`."""


@dataclass
class MicroBatchSpec:
    """Token-budget micro-batching (the reference's `mb_spec`)."""

    max_tokens_per_mb: int = 16384
    """Most tokens (prompt + response, all sequences) in one forward pass."""


@dataclass
class TeacherConfig:
    """The frozen teacher and the distillation term of the loss."""

    path: str = ""
    """Hugging Face model folder or hub name of the teacher; empty means no teacher (pure RL).
    With `backend: openai` it is the model name the server serves."""
    dtype: DType = "auto"
    """Dtype the teacher is loaded and run in. `auto`: bfloat16 where it is native (CUDA GPUs
    with bf16, CPUs with avx512_bf16 or AMX), float32 elsewhere (bf16 is emulated, and much
    slower, on other CPUs)."""
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
    distill_loss_weight_final: float | None = None
    """KDRL schedule: the distillation weight moves linearly from `distill_loss_weight` to this
    value over `distill_decay_steps` steps, then stays; null keeps it constant."""
    distill_decay_steps: int = 0
    """Length of the linear distillation-weight schedule, in optimizer steps."""
    kd_correct_weight: float = 1.0
    """KDRL reward-guided masking: the distillation term of a response whose reward is correct
    (>= `reward.correct_threshold`) is multiplied by this; 0 drops it, 1 keeps it."""
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
    backend: TeacherBackend = "local"
    """Where the teacher runs: `local` (loaded in this process), `http` (a `kdrl serve-teacher`
    server at `url`), or `openai` (a vLLM OpenAI-compatible server at `url`, read through its
    prompt log-probs; sampled-token estimators only)."""
    url: str = ""
    """Base URL of the teacher server for `http` / `openai` (e.g. `http://10.0.0.2:8000`)."""
    timeout_s: float = 300.0
    """Seconds one teacher request may take before it is retried."""
    max_retries: int = 5
    """Retries of a failed teacher request (exponential backoff) before the run stops."""


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
class DataConfig:
    """Training prompts: a local JSONL / JSON / Parquet / CSV file or a `datasets` name."""

    path: str = ""
    """Local file, or a name for `datasets.load_dataset` (e.g. `openai/gsm8k`)."""
    name: str | None = None
    """Dataset configuration name for `load_dataset` (e.g. `main` for GSM8K)."""
    split: str = "train"
    """Split to read from a `datasets` name; ignored for a local file."""
    prompt_field: str = "prompt"
    """Field holding the prompt text (used when `messages_field` is null)."""
    messages_field: str | None = None
    """Field holding chat messages (a list of {role, content}); overrides `prompt_field`."""
    answer_field: str | None = None
    """Field holding the reference answer the reward function checks; null for none."""
    prompt_template: str = "{prompt}"
    """Python format string for the user message: `{prompt}` is the `prompt_field` text, and any
    other field of the row can be used by name (e.g. `Q: {question}`)."""
    system_prompt: str | None = None
    """System message put before the prompt; null for none."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (generation prompt added)."""
    max_prompt_tokens: int = 1024
    """Longest prompt, in tokens after templating."""
    overlong_prompt: OverlongPolicy = "error"
    """What to do with a longer prompt: `error` (names file and row), `skip` (counted and
    logged) or `truncate_left` (keep its last tokens)."""
    shuffle: bool = True
    """Shuffle prompts each epoch (deterministically from `seed` and the epoch)."""


@dataclass
class RewardConfig:
    """The task reward used by GRPO and for accuracy."""

    fn: str = "none"
    """Reward function: `none`, `gsm8k`, `math`, `exact_match`, `contains` (one of the
    reference's `|`-separated alternatives appears as whole words, any case), or
    `package.module:function` called as `fn(completion: str, answer: str | None) -> float`.
    `none` is for pure distillation: with `teacher.rl_loss_weight` > 0, GRPO needs a reward.
    Checked on the first rows' reference answers before training."""
    correct_threshold: float = 1.0
    """A response counts as correct (accuracy, reward-guided masking) when reward >= this."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0, in optimizer steps."""
    lr_schedule: LRSchedule = "constant"
    """Decay after warmup, down to `min_lr_ratio * lr` at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` (linear and cosine schedules)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainConfig:
    """Run length, batching, checkpoints and logging."""

    output_dir: str = "runs/kdrl"
    """Run directory: resolved config, metrics, TensorBoard logs, checkpoints."""
    batch_size: int = 8
    """Prompts per step (the step samples `batch_size * rollout.n_samples` responses)."""
    epochs: int = 1
    """Passes over the prompts; the run stops at whichever of `epochs`, `max_steps` ends first."""
    max_steps: int = 0
    """Stop after this many steps; 0 means no limit (epochs decide)."""
    ppo_n_minibatches: int = 1
    """Optimizer steps per rollout batch (each on an equal share of the sequences)."""
    mb_spec: MicroBatchSpec = field(default_factory=MicroBatchSpec)
    """Micro-batching of the student's forward and backward passes (gradient accumulation)."""
    save_every_steps: int = 0
    """Checkpoint every this many steps; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted once a new one is complete."""
    tensorboard: bool = True
    """Write TensorBoard event files under `output_dir/tensorboard`."""
    wandb: WandbMode = "off"
    """Weights & Biases logging: `off`, `offline` (no network) or `online`."""
    threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""
    device: str = "auto"
    """Where the models run: `auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`.
    Under torchrun `auto` and `cuda` mean each rank's own GPU."""
    parallel: ParallelStrategy = "fsdp"
    """Data parallelism under `torchrun`: `fsdp` shards the student (FSDP2), `ddp` replicates
    it. Ignored in a single process. `batch_size` must divide by the number of ranks."""
    skip_nonfinite: bool = False
    """What a nan/inf loss or gradient norm does. It is always caught before the optimizer step,
    which then does not happen (weights, optimizer state and LR schedule untouched; earlier
    minibatches of the step keep their updates). false: the run stops with an error naming the
    step and the value. true: the step's gradients are dropped, a warning is logged, the run
    goes on, and `optim/skipped_steps` counts the skipped optimizer steps (a skipped step does
    not advance the LR schedule)."""
    max_skipped_steps: int = 10
    """With `skip_nonfinite`: stop the run with an error once more than this many optimizer
    steps (one per minibatch) have been skipped in total, resumed runs included."""
    guard_patience_steps: int = 5
    """Degeneracy guard: warn when the sampled answers of the last this many steps, pooled, end
    with EOS less often than `guard_min_eos_frac` or repeat more than `guard_max_repeat_frac`
    of their 3-grams (`rollout/eos_frac`, `rollout/repeat_frac`). Once when a limit is crossed,
    again only after it recovered; it never stops the run. 0 turns the guard off."""
    guard_min_eos_frac: float | None = 0.1
    """Degeneracy guard: warn when fewer than this share of the sampled answers end with EOS
    within `rollout.max_new_tokens`; null turns this check off."""
    guard_max_repeat_frac: float | None = 0.5
    """Degeneracy guard: warn when the sampled answers repeat, on average, more than this share
    of their 3-grams (a loop); null turns this check off."""


@dataclass
class EvalConfig:
    """Periodic and `kdrl eval` evaluation on held-out prompts (same fields as `data`)."""

    path: str = ""
    """Held-out prompts (local file or `datasets` name); empty disables evaluation."""
    split: str = "test"
    """Split of `path` to read."""
    every_steps: int = 0
    """Evaluate every this many steps during training; 0 only at the start and the end."""
    max_prompts: int = 0
    """Evaluate on the first this many prompts; 0 means all."""
    temperature: float = 0.0
    """Sampling temperature for evaluation answers; 0 is greedy."""
    greedy: bool = True
    """Also score greedy answers (`eval/accuracy_greedy`, `eval/agreement_greedy`): a second
    pass of answers when `temperature` > 0 (at 0 the answers are greedy already and are reused)."""


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
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The task reward."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training prompts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batching, checkpoints and logging."""
