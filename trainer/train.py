"""The training loop: mini-batches of (user, positive), sampled negatives, Adam, early stopping.

Deterministic for a seed on one thread (``threads=1``). On two or more, runs of one seed differ in the
last bits (3e-7 on the item table after an ml-100k epoch, measured on the torch-only code before the
compiled loops of trainer/kernels.py as well as after), which early stopping can turn into another
epoch count. Every epoch records the diagnostics DESIGN.md asks for
(mean positive/negative score, informative and false-negative rates, index refresh/search time,
share of time spent sampling, events/s) so that strategies can be compared on more than NDCG.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/faiss load OpenMP: see trainer/model.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import distributed as dist  # noqa: E402
from trainer.batch import Columns, assemble  # noqa: E402
from trainer.config import PRECISIONS, TrainConfig  # noqa: E402
from trainer.data import Dataset, csr  # noqa: E402
from trainer.evaluate import blas_threads, dot_scores, evaluate  # noqa: E402
from trainer.losses import get_loss  # noqa: E402
from trainer.model import HistorySampler, TowerModel  # noqa: E402
from trainer.optim import RowAdam  # noqa: E402
from trainer.samplers import Draw, HardSampler, MixedSampler, PairIndex, Sampler, make_sampler  # noqa: E402
from trainer.stopping import EarlyStopping, Validation  # noqa: E402

INFORMATIVE_MARGIN = 1.0  # a negative is informative when its logit is within this of the positive's
# losses for which a repeated shared item may be one column with its correction lowered (trainer/batch.py)
MERGING_LOSSES = ("softmax", "bpr")
BF16_ROWS = 64  # the bfloat16 logits product pads its operands' rows to a multiple of this (_bf16_product)


@dataclass
class TrainResult:
    model: TowerModel
    config: TrainConfig
    history: list[dict[str, Any]]
    best_epoch: int
    best_val: dict[str, float]
    seconds: float


class _Stats:
    """Running sums for one epoch's diagnostics."""

    def __init__(self) -> None:
        self.n_pos = self.n_neg = self.n_inf = self.n_fn = self.n_fn_checked = 0
        self.pos_sum = self.neg_sum = self.loss_sum = 0.0
        self.steps = 0
        self.sampling_seconds = 0.0
        self.by_source: dict[str, list[float]] = {}
        self.fn_by_source: dict[str, list[int]] = {}  # [validation positives among them, negatives checked]

    def add(self, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, sources: list[tuple[str, int]]) -> None:
        m = mask.float()
        self.n_pos += pos.numel()
        self.pos_sum += float(pos.sum())
        self.n_neg += float(m.sum())
        self.neg_sum += float((neg * m).sum())
        inf = (neg > pos[:, None] - INFORMATIVE_MARGIN) & mask
        self.n_inf += float(inf.sum())
        col = 0
        for name, width in sources:
            sl = slice(col, col + width)
            acc = self.by_source.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += float(m[:, sl].sum())
            acc[1] += float((neg[:, sl] * m[:, sl]).sum())
            acc[2] += float(inf[:, sl].sum())
            col += width


def _warm_start(model: TowerModel, state: dict[str, Any], data: Dataset) -> int:
    """Copy rows of a previous model's tables by external id; new users/items and tables the previous
    model lacked keep their fresh init."""
    copied = 0
    old_tables = state["state_dict"]
    with torch.no_grad():
        for name, emb in (("user", model.user), ("item", model.item), ("bias", model.bias),
                          ("history", model.history)):
            key = f"{name}.weight"
            if emb is None or key not in old_tables:
                continue
            table, old = emb.weight, old_tables[key]
            old_ids, new_ids = (state["user_ids"], data.user_ids) if name == "user" else (state["item_ids"], data.item_ids)
            if old.shape[1] != table.shape[1]:
                raise ValueError(f"warm start: previous dim {old.shape[1]} != {table.shape[1]}")
            row = {x: i for i, x in enumerate(old_ids)}
            pairs = [(i, row[x]) for i, x in enumerate(new_ids) if x in row]
            if pairs:
                dst, src = map(torch.tensor, zip(*pairs, strict=True))
                table[dst] = old[src]
                copied += len(pairs)
    return copied


def _hard_samplers(sampler: Sampler) -> list[HardSampler]:
    if isinstance(sampler, HardSampler):
        return [sampler]
    if isinstance(sampler, MixedSampler):
        return [c.sampler for c in sampler.components if isinstance(c.sampler, HardSampler)]
    return []


def _active(sampler: Sampler, step: int) -> list[Sampler]:
    return sampler.active(step) if isinstance(sampler, MixedSampler) else [sampler]


@dataclass
class _Run:
    """What one fit carries from step to step."""

    data: Dataset
    cfg: TrainConfig
    model: TowerModel
    opt: Any  # RowAdam, or torch's Adam with dense gradients
    sampler: Sampler
    hard: list[HardSampler]
    train_csr: Any
    histories: HistorySampler
    val_csr: Any  # validation positives (users x items), for the false-negative rate
    val_pairs: PairIndex  # the same pairs as a membership test
    loss_fn: Any
    device: torch.device
    draw_rng: np.random.Generator
    bf16: bool = False  # the shared logits product in bfloat16 (TrainConfig.logits_precision)
    step: int = 0


# (epoch, best epoch so far, that epoch's weights, the epochs' diagnostics so far) -> stop now?
EpochHook = Callable[[int, int, dict[str, torch.Tensor], list[dict[str, Any]]], bool]


@dataclass
class _Epochs:
    """What a fit keeps across epochs: early stopping, the history, the hook, the epoch lines."""

    cfg: TrainConfig
    stopper: EarlyStopping
    on_epoch: EpochHook | None
    label: str
    rank: int
    history: list[dict[str, Any]]

    def close(self, epoch: int, diag: dict[str, Any], val: dict[str, float],
              state: dict[str, torch.Tensor] | None = None) -> bool:
        """An epoch's validation is known: record it, print its line; True: the fit stops here. ``state``
        is a copy of the epoch's weights when the model has trained on since (None: the model's own)."""
        diag.update({f"val_{k}": v for k, v in val.items()})
        self.history.append(diag)
        if self.rank == 0:
            _epoch_line(self.cfg, diag, self.label)
        # no validation: the last is best
        if self.stopper.update(epoch, val.get("ndcg@10", float(epoch)), val, state):
            return True
        if self.on_epoch is None:
            return False
        return self.on_epoch(epoch, self.stopper.epoch, self.stopper.model.state_dict() if state is None else state,
                             self.history)


def fit(data: Dataset, cfg: TrainConfig, *, init_state: dict[str, Any] | None = None,
        impressions: Any = None, on_epoch: EpochHook | None = None, label: str = "") -> TrainResult:
    """Train on data.train_*, early-stop on validation NDCG@10, return the best model and the history.

    ``on_epoch`` is called after every epoch (trainer/lockstep.py steers a second fit with it) and may end
    training; ``label`` prefixes the epoch lines."""
    t_start = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    cfg = for_data(cfg, data)  # select_and_fit resolves it before both its fits; direct callers here
    n_train = data.train_u.size
    if n_train == 0:
        raise ValueError("no training interactions after the split")
    if n_train < world:
        raise ValueError(f"{n_train} training interactions cannot be shared by {world} processes")
    steps_per_epoch = (n_train + cfg.batch_size - 1) // cfg.batch_size
    if world > 1 and n_train - (steps_per_epoch - 1) * cfg.batch_size < world:
        steps_per_epoch -= 1  # a last batch smaller than the world would leave a rank without rows
    rng = np.random.default_rng(cfg.seed)  # batch order: the same on every rank
    run = _setup(data, cfg, steps_per_epoch, rng, init_state, impressions)
    candidates = data.candidates()
    has_val = data.val_u.size > 0
    stopper = EarlyStopping(run.model, cfg.patience, cfg.min_delta)
    epochs = _Epochs(cfg, stopper, on_epoch, label, rank, [])
    pending: Validation | None = None  # the last epoch's validation, beside this one (one process only)
    for epoch in range(1, cfg.epochs + 1):
        abort = None if pending is None else functools.partial(pending.says_stop, stopper)
        # a labelled fit (the final fit's process) prints its lines but no bar: two bars garble a terminal
        stats, seconds, sampling = _epoch(run, rng.permutation(n_train), steps_per_epoch, epoch, rank, world,
                                          show_bar=rank == 0 and not label, abort=abort)
        run.model.eval()
        diag = _diagnostics(epoch, stats, run.sampler, seconds, sampling, n_train)
        diag["processes"] = world
        diag["threads"] = torch.get_num_threads()  # what this process's steps really ran on
        diag["logits_precision"] = "bfloat16" if run.bf16 else "float32"
        if pending is not None:
            last, pending = pending, None
            if epochs.close(last.epoch, last.diag, last.result(), last.state):
                break  # this epoch trained past the end: its weights are never used
        if has_val and world == 1:
            vectors = run.model.export()
            pending = Validation(epoch, diag, run.model, functools.partial(
                _score_validation, *vectors, data, run.train_csr, candidates, cfg))
            continue
        # rank 0 validates and tells the others, so that every rank stops at the same epoch
        val = dist.broadcast(_validate(run.model, data, run.train_csr, candidates, cfg)
                             if has_val and rank == 0 else {})
        if epochs.close(epoch, diag, val):
            break
    if pending is not None:  # the cap on epochs came first
        epochs.close(pending.epoch, pending.diag, pending.result(), pending.state)
    run.model.load_state_dict(stopper.state)
    run.model.to("cpu").eval()
    return TrainResult(run.model, cfg, epochs.history, stopper.epoch, stopper.val, time.perf_counter() - t_start)


def _setup(data: Dataset, cfg: TrainConfig, steps_per_epoch: int, rng: np.random.Generator,
           init_state: dict[str, Any] | None, impressions: Any) -> _Run:
    """Threads, sampler, model, optimiser: everything a step needs."""
    rank, world = dist.rank(), dist.world_size()
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial tables on every rank (and rank 0's are broadcast below)
    # The only thread setting of a fit. FAISS and torch can resolve to one OpenMP runtime: a FAISS setting
    # of 1 thread made after this one left every fit but a process's first on one thread (measured: the
    # final fit's gowalla epochs took 5.3 s instead of 3.6 s). Mining's FAISS searches use the same threads.
    torch.set_num_threads(_fit_threads(cfg))
    draw_rng = rng if world == 1 else np.random.default_rng((cfg.seed, rank))  # negatives: each rank its own
    hard_rows = cfg.sampler.hard_rows  # per global batch: each rank mines its share of the rows
    scfg = replace(cfg.sampler, hard_warmup_steps=cfg.hard_warmup_epochs * steps_per_epoch,
                   hard_rows=None if hard_rows is None else max(1, -(-hard_rows // world)))
    train_csr = data.train_csr()
    sampler = make_sampler(scfg, popularity=data.popularity(), known=train_csr, feedback=data.feedback,
                           impressions=impressions)
    hard = _hard_samplers(sampler)
    if device.type == "cuda":
        for h in hard:  # FAISS GPU search when the GPU build is installed; CPU search otherwise
            h.use_gpu(device.index or 0)
    model = new_model(data, cfg, train_csr)
    if init_state is not None:
        _warm_start(model, init_state, data)
    model.to(device)
    dist.same_parameters(model)
    opt = (RowAdam(list(model.parameters()), lr=cfg.lr) if cfg.sparse
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    val_csr = csr(data.val_u, data.val_i, data.n_users, data.n_items)
    return _Run(data, cfg, model, opt, sampler, hard, train_csr, HistorySampler(train_csr, cfg.history_cap),
                val_csr, PairIndex(val_csr), get_loss(cfg.loss), device, draw_rng,
                bf16=_bf16_logits(cfg.logits_precision, device))


def for_data(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    """``cfg`` with what ``data`` decides resolved (``TrainConfig.for_data``); as it is when nothing is left."""
    if cfg.resolved():
        return cfg
    return cfg.for_data(data.median_positives(), data.train_u.size)


def new_model(data: Dataset, cfg: TrainConfig, train_csr: Any = None) -> TowerModel:
    """A fresh model for ``data`` (its tables initialised from torch's current seed)."""
    model = TowerModel(data.n_users, data.n_items, cfg.dim, tower=cfg.user_tower(), sparse=cfg.sparse,
                       tie_history=cfg.tie_history)
    model.positives = data.train_csr() if train_csr is None else train_csr
    return model


def _epoch(run: _Run, perm: np.ndarray, steps: int, epoch: int, rank: int, world: int,
           show_bar: bool = True, abort: Callable[[], bool] | None = None) -> tuple[_Stats, float, float]:
    """One pass over the training pairs (cut short when ``abort()`` says so); the epoch's statistics,
    seconds and seconds spent sampling."""
    for h in run.hard:
        h.reset_stats()
    stats = _Stats()
    t_epoch = time.perf_counter()
    bar = _progress(run.cfg, steps, epoch) if show_bar else None
    run.model.train()
    bs = run.cfg.batch_size
    for b in range(steps):
        if abort is not None and abort():
            break
        idx = perm[b * bs:(b + 1) * bs]
        if world > 1:
            idx = np.array_split(idx, world)[rank]  # the global batch, shared between the ranks
        loss = _step(run, idx, stats, measure=b % run.cfg.diag_every == 0)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", ev_s=f"{(b + 1) * bs / (time.perf_counter() - t_epoch):.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return stats, time.perf_counter() - t_epoch, stats.sampling_seconds


def _step(run: _Run, idx: np.ndarray, stats: _Stats, measure: bool) -> float:
    """Draw negatives for the rows ``idx``, score them, one optimiser step; returns the loss."""
    data, device = run.data, run.device
    users_np, pos_np = data.train_u[idx], data.train_i[idx]
    ts = time.perf_counter()
    run.sampler.on_step(run.step, run.model.item_table)
    active = _active(run.sampler, run.step)
    stats.sampling_seconds += time.perf_counter() - ts
    # rows of one user share one query and its shared negatives' logits (trainer/batch.py)
    q_users, row_query = (np.unique(users_np, return_inverse=True) if _shares_queries(run.cfg, active)
                          else (users_np, None))
    users = torch.from_numpy(q_users).to(device)
    # each positive is left out of the query that scores it: predict it from the user's other items
    bags = (run.histories.bags(q_users, pos_np, run.draw_rng, device, row_query)
            if run.model.history is not None else None)
    ts = time.perf_counter()
    query = None
    hard = [s for s in active if s.name == "hard"]
    if hard:  # the current vectors of the users whose rows are mined (the first max_rows) search the index
        mined = min(q_users.size, max(s.max_rows or q_users.size for s in hard))
        with torch.no_grad():
            query = run.model.users(users[:mined], None if bags is None else bags.head(mined)).cpu().numpy()
    draws = run.sampler.sample(users_np, pos_np, run.draw_rng, query, run.step)
    # the rows' own training items are not negatives (TrainConfig.mask_known; trainer/batch.py)
    known = run.train_csr[q_users] if run.cfg.mask_known else None
    cols = assemble(pos_np, draws, [s for s in active if s.prob(pos_np[:1]) is not None], run.cfg.logq, known,
                    row_query, merge=run.cfg.loss in MERGING_LOSSES)
    stats.sampling_seconds += time.perf_counter() - ts
    # one forward: every embedding row this step touches
    u, iv = run.model(users, bags, torch.from_numpy(cols.lookup).to(device))
    rows = None if row_query is None else torch.from_numpy(row_query).to(device)
    pos, neg = _logits(u, iv, cols, idx.size, rows, run.bf16)
    mask = (tuple(torch.from_numpy(a).to(device) for a in cols.off_positions()) if cols.off is not None
            else torch.from_numpy(cols.mask).to(device))
    # pair weights enter as per-row loss weights: measured better than drawing pairs in proportion
    # to their weight (a planted log, all three losses, two seeds; see docs/operations.md)
    row_w = None if data.train_w is None else torch.from_numpy(data.train_w[idx].astype(np.float32)).to(device)
    loss = run.loss_fn(pos, neg, torch.from_numpy(cols.pos_logq).to(device),
                       torch.from_numpy(cols.neg_logq).to(device), mask, row_w, rows)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients(list(run.model.parameters()), run.cfg.sparse)  # more than one rank: all apply the same update
    run.opt.step()
    run.step += 1
    stats.loss_sum += float(loss.detach())
    stats.steps += 1
    if measure:  # diagnostics on a fixed share of steps and rows keep them cheap
        _measure(run, stats, users_np, draws, pos.detach(), neg.detach(), cols)
    return float(loss.detach())


def _shares_queries(cfg: TrainConfig, active: list[Sampler]) -> bool:
    """Rows of one user can share a query when its mask is per user (the known mask), its history is the
    whole history (capped bags are drawn per row) and every active source's negatives are shared."""
    return cfg.mask_known and cfg.history_cap is None and all(s.shared for s in active)


def _logits(u: torch.Tensor, iv: torch.Tensor, cols: Columns, b: int,
            rows: torch.Tensor | None = None, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The positives' logits (B,) and the negatives' (Q, C + W), from the query vectors ``u`` (Q; row b
    reads query ``rows[b]``, or b) and the item vectors of ``cols.lookup``."""
    # one split, not a slice per block: each slice's gradient came back as a zero-filled copy of the
    # whole block, added to the others' (~3% of a step); a split's is one concatenation
    widths = [width for source, width in cols.shared if source != "in-batch"]
    p, *drawn, rest = iv.split([b, *widths, iv.shape[0] - b - sum(widths)])
    blocks = iter(drawn)
    vecs = [p if source == "in-batch" else next(blocks) for source, _ in cols.shared]
    if not vecs:
        neg = u.new_zeros(u.shape[0], 0)
    elif bf16:  # the largest product of a step: a fraction of the time where the CPU multiplies bfloat16 natively
        neg = _bf16_product(u, torch.cat(vecs))
    else:
        neg = u @ torch.cat(vecs).T  # shared: one (Q, C) matmul
    if cols.width:  # per-user columns: one query per row
        live = torch.from_numpy(cols.live).to(u.device)
        block = torch.zeros(b, cols.width, device=u.device)
        block = block.index_put((live,), torch.einsum("bd,bnd->bn", u.index_select(0, live),
                                                      rest.reshape(live.numel(), cols.width, -1)))
        neg = torch.cat([neg, block], 1)
    return ((u if rows is None else u.index_select(0, rows)) * p).sum(1), neg


def _bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in bfloat16, returned in float32. Both are padded with zero rows to a multiple of
    ``BF16_ROWS``: oneDNN compiles a bfloat16 kernel for each new shape, and a step's distinct users and
    items change the shape every step (forward and backward of 1000 x 1450 x 129 on an AMX CPU: 16 ms
    with the exact shapes, 6 ms padded, 10 ms in float32)."""
    q, c = a.shape[0], b.shape[0]
    a = F.pad(a.bfloat16(), (0, 0, 0, -q % BF16_ROWS))
    b = F.pad(b.bfloat16(), (0, 0, 0, -c % BF16_ROWS))
    return (a @ b.T)[:q, :c].float()


def _measure(run: _Run, stats: _Stats, users_np: np.ndarray, draws: list[Draw], pos: torch.Tensor,
             neg: torch.Tensor, cols: Columns) -> None:
    """Scores, informative and false-negative rates on the first 256 rows (a fair sample: rows are shuffled)."""
    rows = slice(0, min(users_np.size, 256))
    mask = cols.row_mask(rows)
    neg_rows = neg[rows] if cols.query_of_row is None else neg[torch.from_numpy(cols.query_of_row[rows])]
    per_draw = cols.draw_columns()  # merged columns seen again as one per draw, as the sources drew them
    if per_draw is not None:
        neg_rows = neg_rows.index_select(1, torch.from_numpy(per_draw).to(neg_rows.device))
    stats.add(pos[rows].cpu(), neg_rows.cpu(), torch.from_numpy(mask), cols.sources)
    if run.data.val_u.size:
        fn = _validation_hits(run, users_np, draws, rows) & mask
        stats.n_fn += int(fn.sum())
        stats.n_fn_checked += int(mask.sum())
        col = 0
        for name, width in cols.sources:  # per source: are mined negatives more often a user's next items?
            acc = stats.fn_by_source.setdefault(name, [0, 0])
            acc[0] += int(fn[:, col:col + width].sum())
            acc[1] += int(mask[:, col:col + width].sum())
            col += width


def _validation_hits(run: _Run, users_np: np.ndarray, draws: list[Draw], rows: slice) -> np.ndarray:
    """Which of the ``rows``' negatives are among their user's validation positives, in the columns'
    order (shared draws, then per-user ones). The shared columns are one item list for every row: a
    column gather from the rows' CSR slice, ~15x cheaper than a sorted-key lookup per (row, column)."""
    users = users_np[rows]
    blocks = []
    shared = [d.items for d in draws if d.shared]
    if shared:
        blocks.append(run.val_csr[users][:, np.concatenate(shared)].toarray() > 0)
    per_user = [d.items[rows] for d in draws if not d.shared]
    if per_user:  # a few columns per row: look each (row, item) up
        blocks.append(run.val_pairs.contains(users[:, None], np.concatenate(per_user, axis=1)))
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((users.size, 0), dtype=bool)


def _bf16_logits(precision: str, device: torch.device) -> bool:
    """Whether the shared logits product runs in bfloat16: forced, or ("auto") where the hardware has it
    natively; elsewhere torch emulates bfloat16 and the product gets slower, not faster."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown logits precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in native)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: choose cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this PyTorch build sees no CUDA GPU (torch.cuda.is_available() "
                         "is False); train on the CPU with --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: choose cpu or cuda[:N]")
    return device


def _fit_threads(cfg: TrainConfig) -> int:
    """The threads of one process of a fit: ranks on one machine share its cores."""
    return max(1, cfg.threads // dist.local_world_size())


def _validate(model: TowerModel, data: Dataset, train_csr: Any, candidates: np.ndarray,
              cfg: TrainConfig) -> dict[str, float]:
    """Validation NDCG@10 and friends of the model as it is now."""
    return _score_validation(*model.export(), data, train_csr, candidates, cfg)


def _score_validation(users: np.ndarray, items: np.ndarray, data: Dataset, train_csr: Any,
                      candidates: np.ndarray, cfg: TrainConfig) -> dict[str, float]:
    """Validation NDCG@10 and friends of exported vectors. The score products run on the fit's threads:
    numpy's BLAS would take every core, and beside the final fit's process (trainer/lockstep.py) its
    extra thread ran at half speed on a shared core and held up the others (the products took ~2x as
    long). Set here too: on a thread of its own, torch's count is OpenMP's default, every core."""
    threads = _fit_threads(cfg)
    torch.set_num_threads(threads)
    with blas_threads(threads):
        return evaluate(dot_scores(users, items), train_csr, data.val_u, data.val_i, candidates,
                        max_users=cfg.val_max_users, seed=cfg.seed)


def _diagnostics(epoch: int, s: _Stats, sampler: Sampler, seconds: float, sampling: float,
                 n_train: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "epoch": epoch,
        "loss": s.loss_sum / max(s.steps, 1),
        "mean_pos_score": s.pos_sum / max(s.n_pos, 1),
        "mean_neg_score": s.neg_sum / max(s.n_neg, 1),
        "informative_rate": s.n_inf / max(s.n_neg, 1),
        "train_seconds": round(seconds, 3),
        "sampling_share": round(sampling / max(seconds, 1e-9), 4),
        "events_per_s": round(n_train / max(seconds, 1e-9), 1),
        "sources": {name: {"negatives": int(a[0]), "mean_neg_score": a[1] / max(a[0], 1),
                           "informative_rate": a[2] / max(a[0], 1),
                           **({"false_negative_rate": s.fn_by_source[name][0] / max(s.fn_by_source[name][1], 1)}
                              if name in s.fn_by_source else {})}
                    for name, a in s.by_source.items()},
    }
    if s.n_fn_checked:  # a fit without validation positives (the final fit) has no false-negative rate
        d["false_negative_rate"] = s.n_fn / s.n_fn_checked
    d.update(sampler.stats())
    if "index_refresh_s" in d:
        d["index_share"] = round((d["index_refresh_s"] + d["hard_search_s"]) / max(seconds, 1e-9), 4)
    return d


def _progress(cfg: TrainConfig, total: int, epoch: int) -> Any:
    """A bar that redraws only on a terminal; redirected output gets the epoch's summary line instead."""
    if not cfg.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, unit="step", file=sys.stderr)


def _epoch_line(cfg: TrainConfig, diag: dict[str, Any], label: str = "") -> None:
    """One line per epoch on stderr (a log file or a container's log gets this, never bar redraws)."""
    if not cfg.progress:
        return
    val = f", validation NDCG@10 {diag['val_ndcg@10']:.4f}" if "val_ndcg@10" in diag else ""
    # one write with its newline: the final fit's process writes to the same stream, and print's two
    # writes (text, then newline) let its lines land in the middle of these
    sys.stderr.write(f"{label}epoch {diag['epoch']}: loss {diag['loss']:.4f}{val}, informative negatives "
                     f"{diag['informative_rate']:.1%}, {diag['train_seconds']:.1f}s\n")
    sys.stderr.flush()


def model_state_bytes(result: TrainResult, data: Dataset) -> bytes:
    """The torch state needed to resume or warm-start, stored as the checkpoint's model.pt."""
    buf = io.BytesIO()
    torch.save({"state_dict": result.model.state_dict(), "user_ids": data.user_ids, "item_ids": data.item_ids,
                "config": result.config.to_dict()}, buf)
    return buf.getvalue()


def load_model_state(raw: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
