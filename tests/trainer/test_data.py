"""The protocol split, id maps and the feedback map."""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.data import build_dataset, temporal_split


def _frame(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "type"]).assign(value=np.nan)


def test_split_sizes_follow_ceil_20_percent_and_min_events() -> None:
    for n, expected in ((4, 0), (5, 1), (6, 2), (10, 2), (15, 3), (11, 3)):
        held = temporal_split(np.zeros(n, np.int64), np.arange(n), np.arange(n, dtype=float))
        assert held.sum() == expected, n
        assert held[n - expected :].all()  # the latest events are held out


def test_split_orders_by_timestamp_then_item() -> None:
    ts = np.array([5.0, 1.0, 5.0, 2.0, 3.0])
    items = np.array([9, 1, 3, 2, 4])
    held = temporal_split(np.zeros(5, np.int64), items, ts)
    assert held.tolist() == [True, False, False, False, False]  # (5, 9) is last; (5, 3) comes before it


def test_timestamp_ties_break_by_numeric_item_id_when_ids_are_integers() -> None:
    """As strings "10" < "9"; the protocol compares integer ids as numbers, so item 10 is the newest."""
    rows = [("1", str(i), 0.0, "view") for i in (2, 9, 10, 3, 4)] + [("2", "10", 0.0, "view")]
    data = build_dataset(_frame(rows), validation=False)
    assert [data.item_ids[i] for i in data.test_i] == ["10"]
    assert data.item_ids == ["2", "3", "4", "9", "10"]


def test_build_dataset_drops_unseen_test_items_and_keeps_negatives_apart() -> None:
    rows = [("a", f"i{k}", float(k), "view") for k in range(5)]  # a: 5 events, test = i4
    rows += [("b", f"i{k}", float(k), "view") for k in range(6)]  # b: 6 events, test = i4, i5
    # c has too few positives to be split, so i4 and i5 are train items and the tests above survive
    rows += [("c", "i4", 0.0, "view"), ("c", "i5", 1.0, "view"), ("c", "i0", 2.0, "dislike")]
    data = build_dataset(_frame(rows), validation=False)
    row = data.item_row()
    train_pairs = {
        (data.user_ids[u], data.item_ids[i]) for u, i in zip(data.train_u, data.train_i, strict=True)
    }
    test_pairs = {(data.user_ids[u], data.item_ids[i]) for u, i in zip(data.test_u, data.test_i, strict=True)}
    assert ("a", "i4") in test_pairs  # i4 is in c's train events
    assert ("b", "i4") in test_pairs and ("b", "i5") in test_pairs
    assert ("c", "i0") not in train_pairs  # a dislike is not a positive ...
    assert data.feedback[data.user_row()["c"], row["i0"]] == 1  # ... it is feedback
    assert not train_pairs & test_pairs


def test_unseen_test_item_is_dropped() -> None:
    rows = [("a", f"i{k}", float(k), "view") for k in range(5)]
    data = build_dataset(_frame(rows), validation=False)
    assert data.test_u.size == 0  # i4 appears only in a's test share
    assert data.train_u.size == 4


def test_repeats_keep_first_occurrence_and_validation_is_carved_from_train(
    small_events: pd.DataFrame,
) -> None:
    data = build_dataset(small_events)
    keys = lambda u, i: set((u * data.n_items + i).tolist())  # noqa: E731
    tr, va, te = (
        keys(data.train_u, data.train_i),
        keys(data.val_u, data.val_i),
        keys(data.test_u, data.test_i),
    )
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr) == data.train_u.size  # no repeated pair
    assert data.val_u.size > 0 and data.test_u.size > 0
    pos = small_events[~small_events["type"].isin(["dislike", "skip"])]
    assert data.all_u.size == len(pos.drop_duplicates(["user_id", "item_id"]))


def test_a_dislike_stands_until_a_later_positive_of_the_same_pair() -> None:
    import pandas as pd

    from trainer.data import build_dataset

    rows = [
        ("u1", "a", 1.0, "view"),
        ("u1", "b", 2.0, "click"),
        ("u1", "c", 3.0, "dislike"),  # c stays out
        ("u1", "d", 4.0, "dislike"),
        ("u1", "d", 5.0, "purchase"),  # changed their mind about d
        ("u1", "e", 6.0, "like"),
        ("u1", "e", 7.0, "dislike"),  # and about e, the other way
        ("u2", "a", 1.0, "view"),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "type"]).assign(value=float("nan"))
    data = build_dataset(frame, validation=False)
    item = data.item_row()
    standing = {data.item_ids[i] for i in data.feedback[data.user_row()["u1"]].indices}
    assert standing == {"c", "e"}
    assert data.feedback[data.user_row()["u2"]].nnz == 0
    assert item["d"] in set(data.all_i[data.all_u == data.user_row()["u1"]])
