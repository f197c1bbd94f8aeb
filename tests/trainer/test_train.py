"""Training on a synthetic log with planted clusters: the model finds them, deterministically."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from trainer.batch import assemble
from trainer.config import SamplerConfig, TrainConfig
from trainer.data import build_dataset
from trainer.pipeline import run
from trainer.stopping import EarlyStopping
from trainer.train import BF16_ROWS, _active, _bf16_product, _setup, fit

FAST = dict(epochs=6, batch_size=256, threads=1, progress=False, patience=2)


@pytest.fixture(scope="module")
def data(small_events: pd.DataFrame):  # noqa: ANN201
    return build_dataset(small_events)


def test_model_recovers_planted_clusters_well_above_popularity(small_events: pd.DataFrame) -> None:
    result = run(small_events, TrainConfig(**{**FAST, "epochs": 20, "patience": 3}))
    assert result.held_out["recall@10"] > 1.4 * result.baseline["recall@10"]
    # the learned item vectors group by planted cluster: same-cluster pairs are closer than cross-cluster ones
    _, items = result.final.model.export()
    cluster = small_events.attrs["item_cluster"][[int(i[1:]) for i in result.data.item_ids]]
    taste = items[:, :-1]  # the cosine part; the last column is the item bias
    sim = taste @ taste.T
    same = cluster[:, None] == cluster[None, :]
    off_diag = ~np.eye(len(cluster), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.1


def test_same_seed_same_model(data) -> None:  # noqa: ANN001
    cfg = TrainConfig(**{**FAST, "epochs": 2})
    a, b = fit(data, cfg), fit(data, cfg)
    assert np.array_equal(a.model.export()[1], b.model.export()[1])
    c = fit(data, TrainConfig(**{**FAST, "epochs": 2, "seed": 1}))
    assert not np.array_equal(a.model.export()[1], c.model.export()[1])


@pytest.mark.parametrize("loss", ["softmax", "nce", "bpr"])
def test_every_loss_learns_with_hard_negatives_and_reports_diagnostics(data, loss: str) -> None:  # noqa: ANN001
    cfg = TrainConfig(**{**FAST, "epochs": 4, "hard_warmup_epochs": 1, "loss": loss, "patience": 10},
                      sampler=SamplerConfig(strategy="hard", refresh_every=5, n_negatives=128))
    result = fit(data, cfg)
    first, last = result.history[0], result.history[-1]
    assert last["val_ndcg@10"] > first["val_ndcg@10"] or result.best_val["ndcg@10"] > 0.15
    assert "hard" not in first["sources"] and "hard" in last["sources"]  # warm-up, then hard negatives
    steps = int(np.ceil(data.train_u.size / cfg.batch_size))
    assert last["index_refreshes"] == int(np.ceil(steps / 5))
    for key in ("mean_pos_score", "mean_neg_score", "informative_rate", "false_negative_rate",
                "index_refresh_s", "sampling_share", "events_per_s"):
        assert np.isfinite(last[key]), key
    assert 0 <= last["false_negative_rate"] < 0.2 and 0 < last["informative_rate"] <= 1
    # hard negatives score higher than the uniform ones drawn beside them
    assert last["sources"]["hard"]["mean_neg_score"] > last["sources"]["uniform"]["mean_neg_score"]
    # each source's false-negative rate; mined ones land on the users' held-out items more than uniform ones,
    # over every epoch that mined (one epoch's few hundred mined negatives are too few to order the two:
    # on an AVX2-only CPU the last epoch's came out 0.0154 against 0.0165)
    mined = [h["sources"] for h in result.history if "hard" in h["sources"]]

    def fn_rate(source: str) -> float:
        counts = [m[source]["negatives"] for m in mined]
        return sum(m[source]["false_negative_rate"] * n for m, n in zip(mined, counts, strict=True)) / sum(counts)

    hard_fn, uniform_fn = fn_rate("hard"), fn_rate("uniform")
    assert 0 <= uniform_fn <= hard_fn <= 1 and hard_fn > 0


def test_every_fit_in_a_process_trains_on_the_threads_it_was_given(data) -> None:  # noqa: ANN001
    # a FAISS thread setting made after torch's once left every fit but a process's first on one thread
    cfg = TrainConfig(**{**FAST, "epochs": 1, "hard_warmup_epochs": 0, "threads": 2},
                      sampler=SamplerConfig(strategy="hard", refresh_every=5))
    first, second = fit(data, cfg), fit(data, cfg)
    assert first.history[-1]["threads"] == second.history[-1]["threads"] == 2


def test_logq_changes_in_batch_training(data) -> None:  # noqa: ANN001
    base = {**FAST, "epochs": 2}
    on = fit(data, TrainConfig(**base, sampler=SamplerConfig(strategy="in-batch")))
    off = fit(data, TrainConfig(**base, logq=False, sampler=SamplerConfig(strategy="in-batch")))
    assert not np.allclose(on.model.export()[1], off.model.export()[1])


@pytest.mark.parametrize("tower", ["pooled", "both", "free", "pooled, tied"])
def test_exported_queries_are_the_training_logits_by_the_shared_rule(data, tower: str) -> None:  # noqa: ANN001
    """The torch forward (what training optimises) and trainer/towers.py (what the service applies to
    fresh events) make the same query vectors."""
    import torch

    from trainer.model import Histories

    tied = tower.endswith("tied")
    result = fit(data, TrainConfig(**{**FAST, "epochs": 2, "tower": tower.split(",")[0], "tie_history": tied}))
    model = result.model
    if tied:
        assert model.history is model.item and np.array_equal(model.tables()["history"], model.item.weight.detach().numpy())
    rows = np.arange(0, data.n_users, 7)
    with torch.no_grad():
        q = model.users(torch.from_numpy(rows), Histories.of(model.positives, rows)).numpy()
    users, items = model.export()
    np.testing.assert_allclose(q, users[rows], atol=1e-5)
    assert items.shape[1] == users.shape[1] == model.dim + 1 and np.all(users[:, -1] == 1)  # the item-bias column
    if tower != "free":
        assert result.best_val["ndcg@10"] > 0.1  # pooled histories learn the planted clusters too


def test_early_stopping_counts_only_gains_above_min_delta() -> None:
    """A plateau of gains below ``min_delta`` ends training; the best epoch is the last that cleared it."""
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(model, patience=2, min_delta=0.01)
    scores = [0.100, 0.110, 0.1105, 0.1108, 0.2]  # epochs 3 and 4 gain < 1% over epoch 2's 0.110
    stopped = [stop.update(epoch, s, {"ndcg@10": s}) for epoch, s in enumerate(scores[:4], 1)]
    assert stopped == [False, False, False, True]
    assert (stop.epoch, stop.score) == (2, 0.110)
    plain = EarlyStopping(model, patience=2)  # min_delta 0: any gain counts
    assert [plain.update(e, s, {}) for e, s in enumerate(scores[:4], 1)] == [False] * 4
    assert plain.epoch == 4


def test_would_stop_says_what_update_will() -> None:
    stop = EarlyStopping(torch.nn.Linear(2, 1), patience=2, min_delta=0.01)
    for epoch, score in enumerate([0.1, 0.12, 0.1201, 0.05, 0.3, 0.2, 0.2], 1):
        predicted = stop.would_stop(epoch, score)
        assert predicted == stop.update(epoch, score, {})


def test_validating_beside_the_next_epoch_ships_the_best_epochs_own_weights(data) -> None:  # noqa: ANN001
    """The fit validates each epoch on a thread while the next one trains, and cuts that one short when
    the score says stop: it still returns exactly the weights of its best epoch, the model a fit capped
    at that many epochs trains, and every epoch it reports was validated."""
    cfg = TrainConfig(**{**FAST, "epochs": 30, "patience": 1, "min_delta": 0.02})
    stopped = fit(data, cfg)
    best = stopped.best_epoch
    assert len(stopped.history) == best + 1 < 30  # stopped by validation, not by the cap
    assert all("val_ndcg@10" in h for h in stopped.history)
    capped = fit(data, TrainConfig(**{**FAST, "epochs": best, "patience": 30}))
    assert capped.best_epoch == best and _same_state(stopped.model, capped.model)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_rows_own_training_items_are_never_its_shared_negatives(data) -> None:  # noqa: ANN001
    cfg = TrainConfig(**FAST).for_data(data.median_positives(), data.train_u.size)
    state = _setup(data, cfg, 1, np.random.default_rng(0), None, None)
    users, pos = data.train_u[:256], data.train_i[:256]
    draws = state.sampler.sample(users, pos, state.draw_rng, None, 0)
    items = np.concatenate([d.items for d in draws if d.shared])  # in-batch (the rows' positives), uniform
    own = state.train_csr[users][:, items].toarray() > 0
    own_positive = items[None, :] == pos[:, None]
    assert (own & ~own_positive).sum() > 100  # the planted clusters make such collisions common

    shared = _active(state.sampler, 0)  # in-batch and uniform: both have a global q
    masked = assemble(pos, draws, shared, known=state.train_csr[users]).mask[:, :items.size]
    assert not masked[own].any() and masked[~own].all()  # exactly the user's own items are left out

    unmasked = assemble(pos, draws, shared).mask[:, :items.size]
    assert np.array_equal(unmasked, ~own_positive)  # without the mask: only each row's own positive
    # rows of one user sharing a query get that user's mask: the same as each row's own
    q_users, row_query = np.unique(users, return_inverse=True)
    shared_cols = assemble(pos, draws, shared, known=state.train_csr[q_users], query_of_row=row_query)
    assert shared_cols.mask.shape == (q_users.size, shared_cols.mask.shape[1])
    assert np.array_equal(shared_cols.row_mask(slice(0, users.size)), assemble(pos, draws, shared,
                                                                                known=state.train_csr[users]).mask)


@pytest.mark.parametrize("rows", [(1, 1), (BF16_ROWS, 3 * BF16_ROWS), (BF16_ROWS + 1, 2 * BF16_ROWS - 1)])
def test_the_padded_bfloat16_product_is_the_plain_one(rows: tuple[int, int]) -> None:
    """Padding with zero rows (one compiled kernel per shape bucket) changes neither the product nor
    its gradients, to the bit."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows[0], 129, generator=gen, requires_grad=True)
    b = torch.randn(rows[1], 129, generator=gen, requires_grad=True)
    w = torch.randn(*rows, generator=gen)
    padded = _bf16_product(a, b)
    ga, gb = torch.autograd.grad((padded * w).sum(), (a, b))
    plain = (a.bfloat16() @ b.bfloat16().T).float()
    pa, pb = torch.autograd.grad((plain * w).sum(), (a, b))
    assert padded.shape == rows and padded.dtype == torch.float32
    assert torch.equal(padded, plain) and torch.equal(ga, pa) and torch.equal(gb, pb)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_logits_product_learns_in_either_precision(data, precision: str) -> None:  # noqa: ANN001
    """bfloat16 halves the largest product of a step where the CPU has it natively ("auto"); either
    precision finds the planted clusters, and the run records which one it used."""
    result = fit(data, TrainConfig(**{**FAST, "logits_precision": precision}))
    assert result.history[-1]["logits_precision"] == precision
    assert result.best_val["ndcg@10"] > 0.1
    with pytest.raises(ValueError, match="logits precision"):
        fit(data, TrainConfig(**{**FAST, "logits_precision": "float16"}))
