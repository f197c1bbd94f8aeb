"""Every knob of a training run, in one torch-free place (the CLI reads its defaults from here).

Defaults are the product: `recsys train` with no flags trains exactly ``TrainConfig()``. Anything that
has to depend on the data follows a rule of the data's size documented beside the field, or is chosen on
validation inside the run (the epoch count: training stops when validation stops improving).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from trainer.towers import UserTower

LOSSES = ("softmax", "nce", "bpr")
TOWERS = ("auto", "pooled", "free", "both")
# "auto": a free vector beside the pooled history once the median user has this many training positives
FREE_PART_MIN_MEDIAN = 20
# the default temperature: SHARP_TEMPERATURE from SHARP_MIN_POSITIVES training positives up, softer below
SHARP_TEMPERATURE = 0.15
SHARP_MIN_POSITIVES = 50_000
SOFTEST_TEMPERATURE = 0.35
# the default cap on epochs and patience: this many epochs, or as many as make this many optimiser steps,
# but never more than the last (``TrainConfig.for_data``)
CAP_EPOCHS, CAP_STEPS, CAP_MAX = 30, 3000, 300
PATIENCE_EPOCHS, PATIENCE_STEPS, PATIENCE_MAX = 3, 200, 20
PRECISIONS = ("auto", "float32", "bfloat16")
STRATEGIES = ("uniform", "popularity", "in-batch", "hard", "feedback", "mixed")


@dataclass
class SamplerConfig:
    """Knobs of every strategy; ``make_sampler`` reads the ones its strategy needs."""

    strategy: str = "mixed"
    n_negatives: int = 512  # shared uniform/popularity negatives per batch
    alpha: float = 0.75
    n_hard: int = 16
    pool: int = 100
    skip: int = 5
    refresh_every: int = 200
    index_type: str = "auto"
    hard_warmup_steps: int = 0
    hard_rows: int | None = 256  # rows per batch that get hard negatives (None: every row)
    n_feedback: int = 4
    mixed: tuple[str, ...] = field(default=("in-batch", "uniform"))



def _epochs_by_steps(epochs: int, steps_wanted: int, most: int, steps_per_epoch: int) -> int:
    """``epochs``, or as many epochs as make ``steps_wanted`` optimiser steps when that is more, at most ``most``."""
    return min(max(epochs, -(-steps_wanted // steps_per_epoch)), most)


@dataclass
class TrainConfig:
    dim: int = 128
    epochs: int | None = None  # most epochs; None: by the log's size (``for_data``)
    batch_size: int = 1024
    lr: float = 0.005
    loss: str = "softmax"
    logq: bool = True
    # cosine logits are divided by this; None: by the log's size (``for_data``)
    temperature: float | None = None
    tower: str = "auto"  # user vectors: "pooled" history items, "free" trained vectors, "both", or "auto"
    item_bias: bool = True
    pool_exponent: float = 0.5
    history_cap: int | None = None  # pooled towers: at most this many history items per row and step
    tie_history: bool = True  # pooled towers: pool the item table itself (False: a history table of its own)
    seed: int = 0
    threads: int = 2
    # epochs without a better validation score before training stops; None: by the log's size (``for_data``)
    patience: int | None = None
    # an epoch counts as better only when its validation NDCG@10 beats the best by this share: smaller
    # gains are within the noise of the validation sample, and every epoch spent on them is paid twice,
    # in selection and in the final fit (docs/benchmarks.md, "min_delta")
    min_delta: float = 0.005
    # leave a row's user's own training items out of its shared negatives: on the MovieLens sets a fifth
    # of the in-batch columns and 5-8% of the uniform ones are such items, taught as dislikes
    mask_known: bool = True
    sparse: bool = True  # sparse embedding gradients + lazy Adam (trainer/optim.py): cost ∝ rows touched
    # the shared negatives' logits product, a step's largest: "auto" is bfloat16 where the hardware
    # multiplies it natively (AVX512-BF16 or AMX CPUs, CUDA GPUs that support it; 2.2x faster here, same
    # NDCG@10 on gowalla and ml-latest-small), else float32; "float32" or "bfloat16" to force one
    logits_precision: str = "auto"
    hard_warmup_epochs: int = 3
    val_max_users: int = 5000
    diag_every: int = 10  # measure the false-negative rate on every n-th step
    progress: bool = True
    device: str = "cpu"  # "cuda" or "cuda:N" trains on a GPU; everything else stays on the CPU
    # {event type: weight} applied when the dataset is built (trainer.data.build_dataset); recorded here so
    # the checkpoint manifest says what the model was trained with. None or all-1: unweighted.
    event_weights: dict[str, float] | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def for_data(self, median_positives: float, positives: int) -> TrainConfig:
        """This config with what the data decides resolved: ``tower="auto"`` by the median user's distinct
        training positives; ``temperature``, ``epochs`` and ``patience`` left None by the number of
        training positives.

        Tower: a free vector is one more ``dim``-sized parameter per user, learned from that user's events
        alone. With a handful per user (gowalla, yelp2018: median 3-6) it adds noise to what their pooled
        items say (NDCG@10 -3% and -4%); with dozens (MovieLens: median 52-56) it carries what pooling
        cannot (+4-5%, 3 seeds; docs/benchmarks.md). The threshold sits in the order-of-magnitude gap
        between them; data in between is untested.

        Temperature: a sharp softmax puts the loss on the few negatives scored highest, and with few
        events those are more often items the user would pick. On the four benchmark sets (80k positives
        and more) 0.15 beat 0.1 and 0.2; on MovieLens thinned to 12k and 24k positives softer ones won in
        every cell (0.35: +4% to +15% over 0.15, 3 seeds), at 40k they were level. Below
        ``SHARP_MIN_POSITIVES`` τ grows with the inverse square root of the count, to at most
        ``SOFTEST_TEMPERATURE`` (0.22 at 24k, 0.31 at 12k): above the sharp one in all six thinned cells
        (docs/benchmarks.md, "temperature by the log's size").

        Epochs and patience: what a model learns is set by its optimiser steps, and an epoch of a small
        log is a few of them (13 on gowalla cut to 8% of its users, 174 on the whole set). Counted in
        epochs alone, a cap of 30 stopped small sparse logs while validation still rose (their best
        epochs lie near 1,000 steps, like the full sets'), and a patience of 3 epochs (~40 steps) ended
        them on the first flat stretch. So the cap is ``CAP_EPOCHS`` epochs or ``CAP_STEPS`` steps, and
        the patience ``PATIENCE_EPOCHS`` epochs or ``PATIENCE_STEPS`` steps, whichever is more, up to
        ``CAP_MAX`` and ``PATIENCE_MAX`` epochs (on a tiny log, a step or two an epoch, the step counts
        would be hundreds of passes over the same few events, and a run as long as a large log's): the four
        benchmark sets (78-245 steps an epoch) keep a patience of 3, and the MovieLens sets' caps of 38-39
        epochs lie past where they stop (docs/benchmarks.md, "epochs and patience by steps").
        """
        cfg = self
        if cfg.tower == "auto":
            cfg = replace(cfg, tower="both" if median_positives >= FREE_PART_MIN_MEDIAN else "pooled")
        if cfg.temperature is None:
            softer = SHARP_TEMPERATURE * (SHARP_MIN_POSITIVES / max(positives, 1)) ** 0.5
            cfg = replace(cfg, temperature=round(min(max(softer, SHARP_TEMPERATURE), SOFTEST_TEMPERATURE), 3))
        steps = -(-max(positives, 1) // cfg.batch_size)  # an epoch's steps
        if cfg.epochs is None:
            cfg = replace(cfg, epochs=_epochs_by_steps(CAP_EPOCHS, CAP_STEPS, CAP_MAX, steps))
        if cfg.patience is None:
            cfg = replace(cfg, patience=_epochs_by_steps(PATIENCE_EPOCHS, PATIENCE_STEPS, PATIENCE_MAX, steps))
        return cfg

    def resolved(self) -> bool:
        """Whether nothing is left for the data to decide (``for_data``)."""
        return None not in (self.temperature, self.epochs, self.patience) and self.tower != "auto"

    def user_tower(self) -> UserTower:
        if self.tower not in TOWERS:
            raise ValueError(f"unknown tower {self.tower!r}; choose one of {', '.join(TOWERS)}")
        if self.tower == "auto" or self.temperature is None:  # what a tower is built from
            raise ValueError("the tower and the temperature are resolved for the data first (TrainConfig.for_data)")
        return UserTower(temperature=self.temperature, free=self.tower in ("free", "both"),
                         pooled=self.tower in ("pooled", "both"), pool_exponent=self.pool_exponent,
                         bias=self.item_bias, normalize_parts=self.tower == "both")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sampler"]["mixed"] = list(self.sampler.mixed)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        s = dict(d.pop("sampler", {}))
        if "mixed" in s:
            s["mixed"] = tuple(s["mixed"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known}, sampler=SamplerConfig(**s))


