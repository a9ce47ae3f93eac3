"""Collation against a hand-built example: sentences, truncation, positions, padding, pairs, masking."""

import numpy as np
import pytest

from jepa4rec_dist.config import MaskingConfig, SequenceConfig
from jepa4rec_dist.data.collate import (
    IGNORE_INDEX,
    Collator,
    Masker,
    SequenceEncoder,
    pad_batch,
    sample_rng,
    sample_target_index,
)
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.tokenization import TokenizerInfo

# Three items; token types 1 = key, 2 = value.
ITEMS = [
    ([10, 11, 12], [1, 2, 2], [True, True, False]),  # item 0: key "10", value word "11 12"
    ([20, 21], [1, 2], [True, True]),  # item 1
    ([30, 31, 32, 33], [1, 2, 1, 2], [True, True, True, True]),  # item 2: two attributes
]
TOK = TokenizerInfo(name="hand", vocab_size=1000, cls_id=0, pad_id=1, mask_id=999, special_ids=(0, 1, 2, 3, 999),
                    position_style="roberta")


def table(items=ITEMS):
    lengths = [len(i[0]) for i in items]
    return ItemTable(
        item_ids=[f"i{k}" for k in range(len(items))], domains=["d"] * len(items),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        token_ids=np.concatenate([i[0] for i in items]).astype(np.int32),
        token_types=np.concatenate([i[1] for i in items]).astype(np.int8),
        word_starts=np.concatenate([i[2] for i in items]).astype(bool),
    )


def test_history_is_newest_first_with_item_positions():
    enc = SequenceEncoder(table(), TOK, SequenceConfig()).history([0, 1, 2])
    assert enc.input_ids.tolist() == [0, 30, 31, 32, 33, 20, 21, 10, 11, 12]
    assert enc.token_types.tolist() == [0, 1, 2, 1, 2, 1, 2, 1, 2, 2]
    assert enc.item_positions.tolist() == [0, 1, 1, 1, 1, 2, 2, 3, 3, 3]


def test_max_items_and_max_tokens_drop_the_oldest():
    enc = SequenceEncoder(table(), TOK, SequenceConfig(max_items=2)).history([0, 1, 2])
    assert enc.input_ids.tolist() == [0, 30, 31, 32, 33, 20, 21]
    enc = SequenceEncoder(table(), TOK, SequenceConfig(max_tokens=6)).history([0, 1, 2])
    assert enc.input_ids.tolist() == [0, 30, 31, 32, 33, 20]
    assert enc.item_positions.tolist() == [0, 1, 1, 1, 1, 2]
    single = SequenceEncoder(table(), TOK, SequenceConfig()).item(1)
    assert single.input_ids.tolist() == [0, 20, 21] and single.item_positions.tolist() == [0, 1, 1]


@pytest.mark.parametrize("style, expected", [("roberta", [[2, 3, 4, 5, 6, 1, 1, 1], [2, 3, 4, 5, 6, 7, 8, 1]]),
                                             ("bert", [[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 0]])])
def test_padding_positions_and_masks(style, expected):
    enc = SequenceEncoder(table(), TOK, SequenceConfig())
    seqs = [enc.history([2]), enc.history([1, 2])]  # lengths 5 and 7, padded to 8 (multiple of 4)
    batch = pad_batch(seqs, TOK, SequenceConfig(position_style=style, pad_to_multiple_of=4), max_items=50)
    assert batch["input_ids"].tolist() == [[0, 30, 31, 32, 33, 1, 1, 1], [0, 30, 31, 32, 33, 20, 21, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 3, 3], [0, 1, 2, 1, 2, 1, 2, 3]]
    assert batch["item_position_ids"].tolist() == [[0, 1, 1, 1, 1, 50, 50, 50], [0, 1, 1, 1, 1, 2, 2, 50]]
    assert batch["position_ids"].tolist() == expected
    assert batch["attention_mask"].sum(1).tolist() == [5, 7]
    assert batch["global_mask"].tolist() == [[True] + [False] * 7] * 2


def test_pair_sampling_range():
    for length, low in ((2, 1), (3, 1), (5, 2), (10, 4), (51, 25)):
        seen = {sample_target_index(length, np.random.default_rng(s)) for s in range(400)}
        assert seen == set(range(low, length)), length
    with pytest.raises(ValueError):
        sample_target_index(1, np.random.default_rng(0))


def masked_sets(unit, maskable="all", ratio=0.5, items=(0, 1, 2), seeds=range(30)):
    masker = Masker(MaskingConfig(ratio=ratio, unit=unit, maskable=maskable), TOK)
    enc = SequenceEncoder(table(), TOK, SequenceConfig()).history(list(items))
    out = []
    for seed in seeds:
        _, labels = masker(enc, np.random.default_rng(seed))
        out.append(labels != IGNORE_INDEX)
    return enc, out


def test_token_unit_hits_the_ratio_exactly_and_never_specials():
    enc, sets = masked_sets("token")
    for chosen in sets:
        assert chosen.sum() == 4  # 10 tokens, CLS excluded -> 9 maskable; round(0.5 * 9) = 4 (half to even)
        assert not chosen[0]


def test_word_unit_masks_whole_words():
    enc, sets = masked_sets("word")
    # the only multi-token word is item 0's value "11 12" at positions 8, 9
    assert any(c[8] for c in sets)
    for chosen in sets:
        assert chosen[8] == chosen[9]
        assert 1 <= chosen.sum() <= 5


def test_attribute_and_item_units():
    enc, sets = masked_sets("attribute")
    groups = [[1, 2], [3, 4], [5, 6], [7, 8, 9]]
    for chosen in sets:
        for g in groups:
            assert len(set(chosen[g].tolist())) == 1
    enc, sets = masked_sets("item")
    for chosen in sets:
        for g in ([1, 2, 3, 4], [5, 6], [7, 8, 9]):
            assert len(set(chosen[g].tolist())) == 1
        assert chosen.any()


def test_values_only_masking_leaves_keys():
    enc, sets = masked_sets("token", maskable="values")
    keys = enc.token_types == 1
    for chosen in sets:
        assert not chosen[keys].any() and chosen.sum() == 2  # 5 value tokens, round(2.5) = 2


def test_replacement_shares_80_10_10():
    items = [(list(range(100 + 40 * k, 140 + 40 * k)), [1] + [2] * 39, [True] * 40) for k in range(10)]
    masker = Masker(MaskingConfig(ratio=0.5, unit="token"), TOK)
    enc = SequenceEncoder(table(items), TOK, SequenceConfig()).history(list(range(10)))
    stats = np.zeros(3)
    for seed in range(40):
        masked, labels = masker(enc, np.random.default_rng(seed))
        chosen = labels != IGNORE_INDEX
        assert (labels[chosen] == enc.input_ids[chosen]).all()
        assert (masked[~chosen] == enc.input_ids[~chosen]).all()
        is_mask = masked[chosen] == TOK.mask_id
        kept = masked[chosen] == enc.input_ids[chosen]
        assert not np.isin(masked[chosen][~is_mask], TOK.special_ids).any()
        stats += [is_mask.sum(), (~is_mask & ~kept).sum(), kept.sum()]
    share = stats / stats.sum()
    assert abs(share[0] - 0.8) < 0.02 and abs(share[1] - 0.1) < 0.02 and abs(share[2] - 0.1) < 0.02


def test_collator_is_deterministic_per_sample_and_epoch():
    collator = Collator(table(), TOK, SequenceConfig(), MaskingConfig(ratio=0.5), mode="pretrain", seed=7)
    record = {"items": [0, 1, 2, 0, 1, 2, 1]}
    a, b = collator.example("u000000001", record, epoch=0), collator.example("u000000001", record, epoch=0)
    assert a["next_item_index"] == b["next_item_index"]
    assert (a["history_mask"][0] == b["history_mask"][0]).all()
    differs = [collator.example("u000000001", record, epoch=e)["history_mask"][1] for e in range(1, 6)]
    assert any(len(d) != len(a["history_mask"][1]) or (d != a["history_mask"][1]).any() for d in differs)
    batch = collator.batch([a, collator.example("u000000002", {"items": [2, 1]}, 0)])
    assert batch["keys"] == ["u000000001", "u000000002"]
    assert batch["next_item_index"].tolist()[1] == 1  # length 2: the pair is ([2], 1)
    labels, inputs, masked = batch["history_mlm_labels"], batch["history_input_ids"], batch["history_masked_input_ids"]
    keep = labels == IGNORE_INDEX
    assert (masked[keep] == inputs[keep]).all() and (labels[~keep] == inputs[~keep]).all()
    assert set(batch) >= {"next_input_ids", "next_mlm_labels", "history_global_mask", "next_item_position_ids"}


def test_next_mode_uses_the_last_item_and_no_masking():
    collator = Collator(table(), TOK, SequenceConfig(), None, mode="next")
    ex = collator.example("u1", {"items": [0, 1, 2]}, epoch=0)
    assert ex["next_item_index"] == 2 and ex["history"].input_ids.tolist() == [0, 20, 21, 10, 11, 12]
    assert "history_masked_input_ids" not in collator.batch([ex])


def test_bad_samples_are_named():
    collator = Collator(table(), TOK, SequenceConfig(), None, mode="next")
    with pytest.raises(ValueError, match="u9.*unknown item indices \\[7\\]"):
        collator.example("u9", {"items": [0, 7]}, 0)
    with pytest.raises(ValueError, match="u9.*>= 2 item indices"):
        collator.example("u9", {"items": [0]}, 0)


def test_sample_rng_depends_on_seed_epoch_key():
    draws = {(s, e, k): sample_rng(s, e, k).random() for s in (0, 1) for e in (0, 1) for k in ("u1", "u2")}
    assert len(set(draws.values())) == 8
