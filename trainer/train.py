"""The training loop: mini-batches of (user, positive), sampled negatives, Adam, early stopping.

Deterministic for a seed and a thread count. Every epoch records the diagnostics DESIGN.md asks for
(mean positive/negative score, informative and false-negative rates, index refresh/search time,
share of time spent sampling, events/s) so that strategies can be compared on more than NDCG.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/faiss load OpenMP: see trainer/model.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer import distributed as dist  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import Dataset  # noqa: E402
from trainer.evaluate import dot_scores, evaluate  # noqa: E402
from trainer.losses import get_loss  # noqa: E402
from trainer.model import Histories, TowerModel  # noqa: E402
from trainer.optim import RowAdam  # noqa: E402
from trainer.samplers import HardSampler, MixedSampler, PairIndex, Sampler, make_sampler  # noqa: E402

INFORMATIVE_MARGIN = 1.0  # a negative is informative when its logit is within this of the positive's


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
        self.by_source: dict[str, list[float]] = {}

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


def fit(data: Dataset, cfg: TrainConfig, *, init_state: dict[str, Any] | None = None,
        impressions: Any = None) -> TrainResult:
    """Train on data.train_*, early-stop on validation NDCG@10, return the best model and the history."""
    t_start = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial tables on every rank (DDP also broadcasts rank 0's)
    threads = max(1, cfg.threads // dist.local_world_size())  # ranks on one machine share its cores
    torch.set_num_threads(threads)
    import faiss

    # Mining searches a few hundred users per step: one FAISS thread searched faster than two in every
    # combination measured on a shared 2-core box (0.06-0.10 s against 0.12-0.37 s of search per epoch;
    # a second OpenMP thread waits at the barrier when the core is busy), so FAISS stays single-threaded.
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(cfg.seed)  # batch order: the same on every rank
    draw_rng = rng if world == 1 else np.random.default_rng((cfg.seed, rank))  # negatives: each rank its own
    loss_fn = get_loss(cfg.loss)
    n_train = data.train_u.size
    if n_train == 0:
        raise ValueError("no training interactions after the split")
    if n_train < world:
        raise ValueError(f"{n_train} training interactions cannot be shared by {world} processes")
    steps_per_epoch = (n_train + cfg.batch_size - 1) // cfg.batch_size
    if world > 1 and n_train - (steps_per_epoch - 1) * cfg.batch_size < world:
        steps_per_epoch -= 1  # a last batch smaller than the world would leave a rank without rows
    train_w = data.train_w
    hard_rows = cfg.sampler.hard_rows  # per global batch: each rank mines its share of the rows
    scfg = replace(cfg.sampler, hard_warmup_steps=cfg.hard_warmup_epochs * steps_per_epoch,
                   hard_rows=None if hard_rows is None else max(1, -(-hard_rows // world)))
    popularity = data.popularity()
    train_csr = data.train_csr()
    sampler = make_sampler(scfg, popularity=popularity, known=train_csr, feedback=data.feedback,
                           impressions=impressions)
    hard = _hard_samplers(sampler)
    if device.type == "cuda":
        for h in hard:  # FAISS GPU search when the GPU build is installed; CPU search otherwise
            h.use_gpu(device.index or 0)
    model = TowerModel(data.n_users, data.n_items, cfg.dim, tower=cfg.user_tower(), sparse=cfg.sparse)
    model.positives = train_csr
    if init_state is not None:
        _warm_start(model, init_state, data)
    model.to(device)
    # DDP averages the (sparse) embedding gradients across ranks during backward; one rank: the model itself
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = (RowAdam(list(model.parameters()), lr=cfg.lr) if cfg.sparse
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    val_pairs = PairIndex(_pairs_csr(data.val_u, data.val_i, data.n_users, data.n_items))
    candidates = data.candidates()
    has_val = data.val_u.size > 0

    history: list[dict[str, Any]] = []
    best = (-1.0, 0, copy.deepcopy(model.state_dict()), {})
    step = 0
    bad_epochs = 0
    for epoch in range(1, cfg.epochs + 1):
        for h in hard:
            h.reset_stats()
        stats = _Stats()
        t_epoch = time.perf_counter()
        t_sampling = 0.0
        perm = rng.permutation(n_train)
        bar = _progress(cfg, steps_per_epoch, epoch) if rank == 0 else None
        model.train()
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if world > 1:
                idx = np.array_split(idx, world)[rank]  # the global batch, shared between the ranks
            users_np, pos_np = data.train_u[idx], data.train_i[idx]
            users, pos_items = torch.from_numpy(users_np), torch.from_numpy(pos_np)
            # each positive is left out of its own user's history: predict it from the other items
            bags = Histories.of(train_csr, users_np, pos_np, device) if model.history is not None else None

            ts = time.perf_counter()
            sampler.on_step(step, model.item_table)
            active = _active(sampler, step)
            query = None
            if any(s.name == "hard" for s in active):  # the current user vectors search the index
                with torch.no_grad():
                    query = model.users(users.to(device), bags).cpu().numpy()
            draws = sampler.sample(users_np, pos_np, draw_rng, query, step)
            globals_ = [s for s in active if s.prob(pos_np[:1]) is not None]

            def expected(items: np.ndarray, batch: int = idx.size, globals_: list[Sampler] = globals_) -> np.ndarray:
                return sum((batch if s.name == "in-batch" else s.n) * s.prob(items) for s in globals_)

            t_sampling += time.perf_counter() - ts
            draws = [d for d in draws if d.shared] + [d for d in draws if not d.shared]  # shared columns first
            shared = [d for d in draws if d.shared]
            per_user = [d for d in draws if not d.shared]
            sources = [(d.source, d.items.shape[-1]) for d in draws]
            s_items = np.concatenate([d.items for d in shared])
            own = [d.items for d in shared if d.source != "in-batch"]  # in-batch reuses the positives' rows
            lookup = [pos_np, *own]
            if per_user:
                items_u = torch.from_numpy(np.concatenate([d.items for d in per_user], axis=1))
                valid = torch.from_numpy(np.concatenate([d.valid for d in per_user], axis=1))
                # score only rows that have per-user negatives (hard mining may cover part of the batch)
                live = torch.nonzero(valid.any(1)).squeeze(1)
                lookup.append(items_u[live].reshape(-1).numpy())
            # one forward through DDP: every embedding row this step touches
            u, iv = net(users.to(device), bags, torch.from_numpy(np.concatenate(lookup)).to(device))
            p, rest = iv[:idx.size], iv[idx.size:]
            pos = (u * p).sum(1)
            vecs = []
            for d in shared:
                if d.source == "in-batch":
                    vecs.append(p)
                else:
                    vecs.append(rest[:d.items.size])
                    rest = rest[d.items.size:]
            # shared negatives: one (B, C) matmul against the stacked item vectors
            neg = u @ torch.cat(vecs).T
            s_items_t = torch.from_numpy(s_items).to(device)
            mask = s_items_t[None, :] != pos_items.to(device)[:, None]  # accidental hits (the in-batch diagonal)
            if globals_:
                s_logq = np.log(expected(s_items))
            else:
                s_logq = np.concatenate([np.log(d.n * d.q) for d in shared])
            neg_logq = torch.from_numpy(s_logq.astype(np.float32)).to(device)[None, :]
            if per_user:
                width = items_u.shape[1]
                block = torch.zeros(idx.size, width, device=device)
                live_d = live.to(device)
                block = block.index_put((live_d,), torch.einsum("bd,bnd->bn", u[live_d],
                                                                rest.reshape(live.numel(), width, -1)))
                neg = torch.cat([neg, block], 1)
                mask = torch.cat([mask, (valid & (items_u != pos_items[:, None])).to(device)], 1)
                u_logq = np.concatenate([np.log(d.n * d.q) for d in per_user], axis=1).astype(np.float32)
                neg_logq = torch.cat([neg_logq.expand(idx.size, -1), torch.from_numpy(u_logq).to(device)], 1)
            if cfg.logq:
                pos_logq = (torch.from_numpy(np.log(expected(pos_np)).astype(np.float32))
                            if globals_ else torch.zeros(idx.size)).to(device)
            else:
                neg_logq, pos_logq = torch.zeros(1, 1, device=device), torch.zeros(idx.size, device=device)
            # pair weights enter as per-row loss weights: measured better than drawing pairs in proportion
            # to their weight (a planted log, all three losses, two seeds; see docs/operations.md)
            row_w = None if train_w is None else torch.from_numpy(train_w[idx].astype(np.float32)).to(device)
            loss = loss_fn(pos, neg, pos_logq, neg_logq, mask, row_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

            stats.loss_sum += float(loss.detach())
            stats.steps += 1
            if b % cfg.diag_every == 0:  # diagnostics on a fixed share of steps and rows keep them cheap
                with torch.no_grad():
                    rows = slice(0, min(idx.size, 256))  # a slice of a shuffled batch is a fair sample
                    m_rows = mask[rows].cpu()
                    stats.add(pos.detach()[rows].cpu(), neg.detach()[rows].cpu(), m_rows, sources)
                    if has_val:
                        cols = np.concatenate(
                            [np.broadcast_to(d.items, (idx.size, d.items.shape[-1]))[rows] for d in draws], axis=1)
                        fn = val_pairs.contains(users_np[rows, None], cols) & m_rows.numpy()
                        stats.n_fn += int(fn.sum())
                        stats.n_fn_checked += int(m_rows.sum())
            step += 1
            if bar is not None:
                done = (b + 1) * cfg.batch_size
                bar.set_postfix(loss=f"{loss.item():.4f}", ev_s=f"{done / (time.perf_counter() - t_epoch):.0f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t_epoch
        model.eval()
        # rank 0 validates and tells the others, so that every rank stops at the same epoch
        val = dist.broadcast(_validate(model, data, train_csr, candidates, cfg) if has_val and rank == 0 else {})
        diag = _diagnostics(epoch, stats, sampler, train_seconds, t_sampling, n_train, val)
        diag["processes"] = world
        history.append(diag)
        if rank == 0:
            _epoch_line(cfg, diag)
        score = val.get("ndcg@10", float(epoch))  # without validation the last epoch is the best
        if score > best[0] or epoch == 1:
            best = (score, epoch, copy.deepcopy(model.state_dict()), val)
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    model.load_state_dict(best[2])
    model.to("cpu").eval()
    return TrainResult(model, cfg, history, best[1], best[3], time.perf_counter() - t_start)


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


def _pairs_csr(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int) -> Any:
    from trainer.data import csr

    return csr(u, i, n_users, n_items)


def _validate(model: TowerModel, data: Dataset, train_csr: Any, candidates: np.ndarray,
              cfg: TrainConfig) -> dict[str, float]:
    users, items = model.export()
    return evaluate(dot_scores(users, items), train_csr, data.val_u, data.val_i, candidates,
                    max_users=cfg.val_max_users, seed=cfg.seed)


def _diagnostics(epoch: int, s: _Stats, sampler: Sampler, seconds: float, sampling: float, n_train: int,
                 val: dict[str, float]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "epoch": epoch,
        "loss": s.loss_sum / max(s.steps, 1),
        "mean_pos_score": s.pos_sum / max(s.n_pos, 1),
        "mean_neg_score": s.neg_sum / max(s.n_neg, 1),
        "informative_rate": s.n_inf / max(s.n_neg, 1),
        "false_negative_rate": s.n_fn / max(s.n_fn_checked, 1),
        "train_seconds": round(seconds, 3),
        "sampling_share": round(sampling / max(seconds, 1e-9), 4),
        "events_per_s": round(n_train / max(seconds, 1e-9), 1),
        "sources": {name: {"negatives": int(a[0]), "mean_neg_score": a[1] / max(a[0], 1),
                           "informative_rate": a[2] / max(a[0], 1)} for name, a in s.by_source.items()},
    }
    d.update(sampler.stats())
    if "index_refresh_s" in d:
        d["index_share"] = round((d["index_refresh_s"] + d["hard_search_s"]) / max(seconds, 1e-9), 4)
    d.update({f"val_{k}": v for k, v in val.items()})
    return d


def _progress(cfg: TrainConfig, total: int, epoch: int) -> Any:
    """A bar that redraws only on a terminal; redirected output gets the epoch's summary line instead."""
    if not cfg.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, unit="step", file=sys.stderr)


def _epoch_line(cfg: TrainConfig, diag: dict[str, Any]) -> None:
    """One line per epoch on stderr (a log file or a container's log gets this, never bar redraws)."""
    if not cfg.progress:
        return
    val = f", validation NDCG@10 {diag['val_ndcg@10']:.4f}" if "val_ndcg@10" in diag else ""
    print(f"epoch {diag['epoch']}: loss {diag['loss']:.4f}{val}, informative negatives "
          f"{diag['informative_rate']:.1%}, {diag['train_seconds']:.1f}s", file=sys.stderr, flush=True)


def model_state_bytes(result: TrainResult, data: Dataset) -> bytes:
    """The torch state needed to resume or warm-start, stored as the checkpoint's model.pt."""
    buf = io.BytesIO()
    torch.save({"state_dict": result.model.state_dict(), "user_ids": data.user_ids, "item_ids": data.item_ids,
                "config": result.config.to_dict()}, buf)
    return buf.getvalue()


def load_model_state(raw: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
