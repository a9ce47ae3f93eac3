"""Baselines through the shared harness: popularity, the graph heuristic and text + popularity against
hand-computed rankings, SASRec and GRU4Rec on a deterministic synthetic pattern, held-out new items never
trained, and all of them on real ml-100k."""

import csv
import math
import random

import numpy as np
import pytest
import torch

from jepa4rec_dist.baselines import next_item_loader
from jepa4rec_dist.baselines.graph import GraphConfig, GraphScorer, neighbor_lists, transition_counts
from jepa4rec_dist.baselines.gru4rec import GRU4Rec, GRU4RecConfig, GRU4RecScorer
from jepa4rec_dist.baselines.popularity import PopularityScorer
from jepa4rec_dist.baselines.sasrec import SASRecConfig, SASRecScorer, history_ids, training_windows
from jepa4rec_dist.baselines.text_pop import TextPopConfig, TextPopScorer
from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.prepare import prepare
from jepa4rec_dist.data.shards import iter_records
from jepa4rec_dist.eval.harness import evaluate, rank_batch, top_k


def make_batch(histories, targets):
    return {"keys": [f"u{i}" for i in range(len(targets))], "history_items": histories,
            "next_item_index": torch.tensor(targets)}


def records(*sequences):
    return [{"key": f"u{i}", "items": list(s)} for i, s in enumerate(sequences)]


# --------------------------------------------------------------------------------------------------------
# Popularity
# --------------------------------------------------------------------------------------------------------

def test_popularity_exact_ranks():
    scorer = PopularityScorer(num_items=5).fit(records([0, 1, 2], [1, 2], [2, 3]))  # counts 1, 2, 3, 1, 0
    assert scorer.counts.tolist() == [1, 2, 3, 1, 0]
    batch = make_batch([[4], [0], [1], [2], [3]], [2, 1, 0, 3, 4])
    # item 2 first; item 1 behind 2; items 0 and 3 tie behind 2 and 1 (ties don't count); 4 behind all
    assert rank_batch(scorer, batch, chunk=2).tolist() == [0, 1, 2, 2, 4]
    result = evaluate(scorer, [batch], ks=(1,), progress=False)
    assert result.metrics["recall@1"] == pytest.approx(1 / 5)
    assert result.metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 3 + 1 / 5) / 5)


def test_popularity_bad_input():
    with pytest.raises(ValueError, match="empty training data"):
        PopularityScorer(3).fit([])
    with pytest.raises(ValueError, match=r"unknown item indices \[7\]"):
        PopularityScorer(3).fit(records([0, 7]))
    with pytest.raises(ValueError, match="fit"):
        rank_batch(PopularityScorer(3), make_batch([[0]], [1]))


# --------------------------------------------------------------------------------------------------------
# Graph heuristic
# --------------------------------------------------------------------------------------------------------

# edges 0-1, 1-2, 2-3, 1-4, 5-6, 6-7; item i's embedding is the unit vector at ANGLES[i] degrees
GRAPH_TRAIN = records([0, 1, 2], [2, 3], [1, 4], [5, 6, 7])
ANGLES = [0, 180, 40, 45, 60, 100, -30, 90]


def unit_vectors(angles, scale=1.0):
    rad = np.radians(angles)
    return scale * np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_graph_counts_and_neighbour_order():
    counts = transition_counts([[0, 1, 0, 1], [1, 2], [3, 3, 2]], num_items=4)
    # 0-1 three times (both directions), 1-2 once, 3-2 once, the self-transition 3-3 skipped
    assert counts == {(0, 1): 3, (1, 0): 3, (1, 2): 1, (2, 1): 1, (2, 3): 1, (3, 2): 1}
    lists = neighbor_lists(counts, 4, max_neighbors=None, min_count=1)
    assert [x.tolist() for x in lists] == [[1], [0, 2], [1, 3], [2]]  # by count, then index
    assert [x.tolist() for x in neighbor_lists(counts, 4, max_neighbors=1, min_count=1)] == [[1], [0], [1], [2]]
    assert [x.tolist() for x in neighbor_lists(counts, 4, max_neighbors=None, min_count=2)] == [[1], [0], [], []]


def test_graph_exact_candidate_ordering():
    # unnormalised embeddings: the scorer must normalise them (cosine)
    scorer = GraphScorer(8, unit_vectors(ANGLES, scale=3.0), GraphConfig(last_items=2, hops=2)).fit(GRAPH_TRAIN)
    history = [3, 7, 0]  # anchors: 0 (newest) and 7
    # 2 hops from 0: 1, then 2 and 4; from 7: 6, then 5 -> candidates {1, 2, 4, 5, 6}
    assert scorer.candidates(history) == {1, 2, 4, 5, 6}
    # query = mean of the unit vectors at 0 and 90 degrees: similarity falls with the distance to 45 degrees
    # candidates: 2 (5 deg off), 4 (15), 5 (55), 6 (75), 1 (135); then the rest: 3 (0), 0 and 7 (45, tied)
    scores, items = top_k(scorer, make_batch([history], [0]), k=8, chunk=3, exclude_history=False)
    assert items[0, :6].tolist() == [2, 4, 5, 6, 1, 3]
    assert sorted(items[0, 6:].tolist()) == [0, 7]
    def sim(deg):  # mean cosine to the anchors at 0 and 90 degrees
        return (math.cos(math.radians(deg)) + math.sin(math.radians(deg))) / 2

    assert scores[0, 1].item() == pytest.approx(sim(60) + 2, abs=1e-6)  # candidate 4: offset +2
    assert scores[0, 5].item() == pytest.approx(sim(45) - 2, abs=1e-6)  # non-candidate 3: offset -2
    ranks = rank_batch(scorer, make_batch([history] * 5, [2, 1, 3, 0, 7]), chunk=5)
    assert ranks.tolist() == [0, 4, 5, 6, 6]  # 0 and 7 tie: neither counts the other


def test_graph_config_changes_the_candidates():
    emb = unit_vectors(ANGLES)
    one_hop = GraphScorer(8, emb, GraphConfig(hops=1)).fit(GRAPH_TRAIN)
    assert one_hop.candidates([7, 0]) == {1, 6}
    last_one = GraphScorer(8, emb, GraphConfig(last_items=1)).fit(GRAPH_TRAIN)
    assert last_one.candidates([7, 0]) == {1, 2, 4}
    # with one anchor (item 0 at 0 degrees) similarity is plain cosine: 2 (40 deg), 4 (60), 1 (180)
    _, items = top_k(last_one, make_batch([[7, 0]], [0]), k=3, exclude_history=False)
    assert items[0].tolist() == [2, 4, 1]
    # an anchor without neighbours (the graph is only 0-1): no candidates, pure similarity ranking
    isolated = GraphScorer(8, emb, GraphConfig(last_items=1, hops=1)).fit(records([0, 1]))
    assert isolated.candidates([3]) == set()
    _, items = top_k(isolated, make_batch([[3]], [0]), k=2, exclude_history=False)
    assert items[0].tolist() == [3, 2]  # itself (45 deg), then 2 (40 deg)


def test_graph_bad_input():
    emb = unit_vectors(ANGLES)
    with pytest.raises(ValueError, match="item_embeddings must be"):
        GraphScorer(9, emb)
    with pytest.raises(ValueError, match="zero rows"):
        GraphScorer(2, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="graph.hops"):
        GraphConfig(hops=0)
    with pytest.raises(ValueError, match="empty training data"):
        GraphScorer(8, emb).fit([])
    scorer = GraphScorer(8, emb).fit(GRAPH_TRAIN)
    with pytest.raises(ValueError, match=r"unknown item indices \[8\]"):
        rank_batch(scorer, make_batch([[0, 8]], [1]))
    with pytest.raises(ValueError, match="empty history"):
        rank_batch(scorer, make_batch([[]], [1]))


# --------------------------------------------------------------------------------------------------------
# SASRec
# --------------------------------------------------------------------------------------------------------

def test_training_windows_cover_every_transition_once():
    inputs, targets = training_windows([[10, 11, 12, 13, 14], [5, 6, 7, 8], [9]], max_len=2)
    # [10..14] -> windows [12, 13, 14] and [10, 11, 12]; [5..8] -> [6, 7, 8] and [5, 6] (left-padded)
    assert inputs.tolist() == [[13, 14], [11, 12], [7, 8], [0, 6]]  # ids = index + 1
    assert targets.tolist() == [[13, 14], [11, 12], [7, 8], [-100, 6]]
    assert history_ids([[1, 2, 3], [4]], max_len=2).tolist() == [[3, 4], [0, 5]]


def write_successor_dataset(folder, n_items=20, n_users=120, seed=0):
    """Every user walks item i -> i + 1 (mod n_items) from a random start: the next item is determined."""
    rng = random.Random(seed)
    raw = folder / "raw"
    raw.mkdir(parents=True)
    with open(raw / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows([f"i{i}", f"item number {i}"] for i in range(n_items))
    with open(raw / "inter.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            start = rng.randrange(n_items)
            w.writerows([f"u{u}", f"i{(start + j) % n_items}", 100 + j] for j in range(rng.randint(5, 9)))
    cfg = load_config(overrides=[
        "--data.dataset=generic", f"--data.out_dir={folder / 'prepared'}", f"--data.generic.items={raw / 'items.csv'}",
        f"--data.generic.interactions={raw / 'inter.csv'}", "--data.item_text.attributes=[title]"])
    prepare(cfg, progress=False)
    return folder / "prepared"


def small_sasrec(**kw):
    return SASRecConfig(**{"epochs": 40, "batch_size": 32, "lr": 1e-2, "hidden": 32, "layers": 1, "heads": 2,
                           "dropout": 0.1, "max_len": 8, "patience": 3, **kw})


def test_sasrec_learns_the_successor_pattern(tmp_path):
    root = write_successor_dataset(tmp_path)
    train = list(iter_records(root, "train"))
    ids = {i: int(item_id[1:]) for i, item_id in enumerate(load_item_ids(root))}
    assert all(ids[b] == (ids[a] + 1) % 20 for r in train for a, b in zip(r["items"], r["items"][1:]))
    valid = list(next_item_loader(root, "valid", batch_size=64))
    scorer = SASRecScorer(len(ids), small_sasrec()).fit(train, valid=valid, progress=False)
    test = evaluate(scorer, next_item_loader(root, "test", batch_size=64), ks=(1, 10), progress=False).metrics
    popularity = evaluate(PopularityScorer(len(ids)).fit(train), next_item_loader(root, "test"), ks=(1, 10),
                          progress=False).metrics
    assert test["recall@1"] >= 0.9 and test["recall@10"] == 1.0, test
    assert popularity["recall@1"] < 0.2  # the pattern is not visible to counts
    assert scorer.best_epoch is not None and scorer.history[scorer.best_epoch - 1]["valid_ndcg@10"] >= 0.9


def load_item_ids(root):
    from jepa4rec_dist.data.items import ItemTable

    return ItemTable.load(root).item_ids


def test_sasrec_is_deterministic_and_keeps_the_best_epoch():
    train = records(*[[(s + j) % 12 for j in range(6)] for s in range(12)])
    seen = []

    def falling_metric(scorer):  # epoch 1 is the best; patience 2 -> stop after epoch 3
        seen.append({k: v.clone() for k, v in scorer.model.state_dict().items()})
        return 1.0 / len(seen)

    cfg = small_sasrec(epochs=10, patience=2)
    a = SASRecScorer(12, cfg).fit(train, valid=falling_metric, progress=False)
    assert len(a.history) == 3 and a.best_epoch == 1
    assert all(torch.equal(v, seen[0][k]) for k, v in a.model.state_dict().items())
    b = SASRecScorer(12, cfg).fit(train, valid=falling_metric, progress=False)
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in b.model.state_dict().items())
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = SASRecScorer(12, small_sasrec(epochs=3, seed=1)).fit(train, progress=False)
    assert not torch.equal(c.model.item_emb.weight, a.model.item_emb.weight)


def test_sasrec_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="sasrec.dropout"):
        SASRecConfig(dropout=1.0)
    with pytest.raises(ValueError, match="empty training data"):
        SASRecScorer(5).fit([], progress=False)
    with pytest.raises(ValueError, match="no training sequence has >= 2 items"):
        SASRecScorer(5, small_sasrec(epochs=1)).fit(records([1], [2]), progress=False)
    with pytest.raises(ValueError, match=r"unknown item indices \[5\]"):
        SASRecScorer(5).fit(records([1, 5]), progress=False)
    with pytest.raises(ValueError, match=r"unknown item indices \[-1\]"):
        rank_batch(SASRecScorer(5), make_batch([[-1, 2]], [0]))


# --------------------------------------------------------------------------------------------------------
# GRU4Rec
# --------------------------------------------------------------------------------------------------------

def small_gru(**kw):
    return GRU4RecConfig(**{"epochs": 40, "batch_size": 32, "lr": 1e-2, "embedding": 32, "hidden": 32,
                            "dropout": 0.1, "max_len": 8, "patience": 3, **kw})


def test_gru4rec_never_reads_the_left_padding():
    model = GRU4Rec(9, small_gru()).eval()
    with torch.no_grad():
        padded = model(torch.tensor([[0, 0, 0, 3, 5, 7]]))  # left-padded window of three items
        plain = model(torch.tensor([[3, 5, 7]]))
    assert torch.allclose(padded[0, 3:], plain[0], atol=1e-6)
    assert (padded[0, :3] == 0).all()


def test_gru4rec_learns_the_successor_pattern(tmp_path):
    root = write_successor_dataset(tmp_path)
    train = list(iter_records(root, "train"))
    valid = list(next_item_loader(root, "valid", batch_size=64))
    scorer = GRU4RecScorer(20, small_gru()).fit(train, valid=valid, progress=False)
    test = evaluate(scorer, next_item_loader(root, "test", batch_size=64), ks=(1, 10), progress=False).metrics
    assert test["recall@1"] >= 0.9 and test["recall@10"] == 1.0, test
    report = scorer.fit_report
    assert report["epochs"] == len(scorer.history) and report["best_epoch"] == scorer.best_epoch
    assert report["best_valid_ndcg@10"] >= 0.9 and report["stopped"] in ("patience", "epoch cap")


@pytest.mark.parametrize("cls,cfg", [(SASRecScorer, small_sasrec), (GRU4RecScorer, small_gru)])
def test_held_out_new_items_get_no_training(cls, cfg):
    train = records(*[[(s + j) % 10 for j in range(6)] for s in range(10)])
    trainable = np.ones(12, dtype=bool)
    trainable[[10, 11]] = False  # items 10 and 11 never occur: held out as new
    scorer = cls(12, cfg(epochs=3))
    before = scorer.model.item_table().detach().clone()
    scorer.fit(train, progress=False, trainable=trainable)
    after = scorer.model.item_table().detach()
    assert torch.equal(after[10:], before[10:])  # not even pushed down as negatives
    assert not torch.equal(after[:10], before[:10])
    with pytest.raises(ValueError, match="held-out"):
        cls(12, cfg(epochs=1)).fit(records([1, 10, 2]), progress=False, trainable=trainable)


# --------------------------------------------------------------------------------------------------------
# Text zero-shot + popularity prior
# --------------------------------------------------------------------------------------------------------

def test_text_pop_scores_by_hand_and_picks_beta_on_validation():
    emb = unit_vectors([0, 90, 10, 80])  # items 0, 2 point one way; 1, 3 the other
    train = records([1, 1, 1, 1], [1, 3], [3, 0])  # counts 1, 5, 0, 2
    scorer = TextPopScorer(4, emb, TextPopConfig(betas=[0.0], last_items_grid=[1])).fit(train)
    state = scorer.user_state(make_batch([[0]], [2]))
    expected = torch.tensor(emb @ emb[0], dtype=torch.float32)  # beta 0: plain cosine to item 0
    assert torch.allclose(scorer.item_scores(state, 0, 4)[0], expected, atol=1e-6)
    # validation users whose next item is the popular item 1, with a history close to item 0 in text:
    # only a large beta gets it first, so the grid must pick the largest beta
    valid = [make_batch([[0], [2]], [1, 1])]
    tuned = TextPopScorer(4, emb, TextPopConfig(betas=[0.0, 0.1, 5.0], last_items_grid=[1, 2])).fit(train, valid)
    assert tuned.beta == 5.0 and tuned.fit_report["beta"] == 5.0 and tuned.fit_report["grid_points"] == 6
    assert tuned.fit_report["beta_at_grid_edge"]
    scores = tuned.item_scores(tuned.user_state(make_batch([[0]], [1])), 0, 4)[0]
    assert torch.allclose(scores, expected + 5.0 * torch.log1p(torch.tensor([1.0, 5.0, 0.0, 2.0])), atol=1e-5)
    # history vector: mean of the newest last_items unit vectors
    two = TextPopScorer(4, emb, TextPopConfig(betas=[0.0], last_items_grid=[2])).fit(train)
    mean = torch.nn.functional.normalize(torch.tensor(emb[[1, 2]].mean(0), dtype=torch.float32), dim=0)
    assert torch.allclose(two.user_state(make_batch([[3, 1, 2]], [0]))[0], mean, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Real data: ml-100k
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k")
    prepare(load_config(overrides=["--data.dataset=ml-100k", f"--data.out_dir={out}"]), progress=False)
    return out


def check_sane(metrics):
    assert set(metrics) == {"ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr", "users"}
    assert metrics["users"] == 943
    assert 0 < metrics["ndcg@10"] <= metrics["recall@10"] <= metrics["recall@50"] <= 1
    assert 0 < metrics["mrr"] <= 1


def test_ml100k_popularity_through_the_harness(ml100k):
    train = list(iter_records(ml100k, "train"))
    metrics = evaluate(PopularityScorer(1682).fit(train), next_item_loader(ml100k, "test"), progress=False).metrics
    check_sane(metrics)
    assert metrics["ndcg@10"] > 0.01


@pytest.mark.slow  # ~10-25 s on 2 cores: MiniLM embeds 1,682 item sentences
def test_ml100k_graph_heuristic_with_minilm_text(ml100k):
    from jepa4rec_dist.baselines.text_embed import item_text_embeddings, item_texts

    train = list(iter_records(ml100k, "train"))
    assert item_texts(ml100k)[0] == "title: Toy Story genres: Animation, Children's, Comedy year: 1995"
    emb = item_text_embeddings(ml100k, progress=False)
    assert emb.shape == (1682, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert len(list(ml100k.glob("item_text_minilm_*.npy"))) == 1  # cached next to the dataset
    assert np.array_equal(item_text_embeddings(ml100k, progress=False), emb)
    titles = [t.split(" genres:")[0] for t in item_texts(ml100k)]
    star_wars = titles.index("title: Star Wars")
    nearest = [titles[i] for i in np.argsort(-(emb @ emb[star_wars]))[1:6]]
    assert "title: Return of the Jedi" in nearest or "title: Empire Strikes Back, The" in nearest, nearest

    graph = evaluate(GraphScorer(1682, emb).fit(train), next_item_loader(ml100k, "test"), progress=False).metrics
    popularity = evaluate(PopularityScorer(1682).fit(train), next_item_loader(ml100k, "test"), progress=False).metrics
    check_sane(graph)
    assert graph["ndcg@10"] > popularity["ndcg@10"] > 0.01  # measured: ~.05 vs ~.02
