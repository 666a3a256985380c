"""Semantic-ID pipeline: tokenizers, collision handling, trie, metrics, cache and CLI, on tiny generated data."""
import json
import logging

import pytest
import torch

from recbole_genrec.data.semantic_ids import (build_semantic_ids, fit_codes, filtered_fraction,
                                              front_greater_weights, prefix_dispersion)
from recbole_genrec.tokenizer.collision import append_index, collision_stats, reassign_last
from recbole_genrec.tokenizer.trie import PrefixTrie
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict, write_atomic_dataset

TINY_RQVAE = dict(latent_dim=8, hidden_dims=[32], epochs=30, lr=3e-3, batch_size=128, commitment=0.25)


def settings(name, layers=3, k=8, **extra):
    s = {"tokenizer": name, "num_layers": layers, "codebook_size": k, "seed": 3, "kmeans_iters": 20}
    if name == "rqvae":
        s.update(TINY_RQVAE)
    s.update(extra)
    return s


def planted(n=300, clusters=6, d=24, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * 3
    labels = torch.arange(n) % clusters
    return centers[labels] + spread * torch.randn(n, d, generator=g), labels


def purity(codes, labels):
    return sum(int(torch.bincount(labels[codes == c]).max()) for c in codes.unique()) / len(labels)


def is_unique(codes):
    return collision_stats(codes)["unique_codes"] == codes.shape[0]


@pytest.mark.parametrize("name", ["rqvae", "rqkmeans", "pq"])
def test_first_layer_recovers_planted_clusters(name):
    x, labels = planted()
    codes, sizes, soft, raw, tok = fit_codes(x, settings(name), "append")
    assert purity(raw[:, 0], labels) > 0.9
    assert codes.shape == (300, 4) and is_unique(codes)
    assert len(soft) == 4 and soft[-1] is None
    assert soft[0].shape == (300, 8) and torch.allclose(soft[0].sum(1), torch.ones(300), atol=1e-4)
    assert sizes[:3] == [8, 8, 8] and sizes[3] == int(codes[:, 3].max()) + 1


@pytest.mark.parametrize("name", ["rqvae", "rqkmeans", "pq"])
@pytest.mark.parametrize("collision", ["append", "reassign"])
def test_ids_unique_after_collision_handling(name, collision):
    x = torch.randn(200, 24, generator=torch.Generator().manual_seed(1))
    codes, sizes, _, raw, _ = fit_codes(x, settings(name, k=16), collision)
    assert is_unique(codes)
    assert codes.shape[1] == (4 if collision == "append" else 3)
    assert (codes < torch.tensor(sizes)).all()
    if collision == "reassign":  # only the last token may change
        assert torch.equal(codes[:, :2], raw[:, :2])


def test_rqkmeans_is_deterministic():
    x, _ = planted(seed=5)
    a = fit_codes(x, settings("rqkmeans"), "append")[0]
    b = fit_codes(x, settings("rqkmeans"), "append")[0]
    assert torch.equal(a, b)


def test_append_and_reassign_by_hand():
    raw = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    codes, extra = append_index(raw)
    assert codes[:, 2].tolist() == [0, 1, 0, 2] and extra == 3
    dist = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 2.0, 3.0], [9.0, 9.0, 9.0, 0.1], [3.0, 2.0, 1.0, 0.0]])
    moved, n = reassign_last(raw, lambda rows: dist[rows.long() if hasattr(rows, "long") else rows], 4)
    # item 1 is closest to code (0,1) and keeps it; items 0 and 3 move to their nearest free codes
    assert moved[1].tolist() == [0, 1] and moved[0].tolist() == [0, 0] and moved[3].tolist() == [0, 3]
    assert n == 2 and is_unique(moved)
    with pytest.raises(GenRecError, match="collision=append"):
        reassign_last(torch.zeros(5, 2, dtype=torch.long), lambda rows: torch.zeros(len(rows), 4), 4)


def test_prefix_trie_tables():
    codes = torch.tensor([[1, 0], [1, 2], [0, 1]])
    trie = PrefixTrie.from_codes(codes, item_ids=[5, 6, 7], codebook_sizes=[2, 3])
    assert trie.children[0].tolist() == [[0, 1]]  # root: token 0 -> node 0, token 1 -> node 1
    assert trie.children[1].tolist() == [[-1, 0, -1], [1, -1, 2]]
    assert trie.leaf_item.tolist() == [7, 5, 6]
    assert trie.lookup(torch.tensor([[1, 2], [0, 0], [1, 0]])).tolist() == [6, -1, 5]
    assert trie.valid_mask([1], 1).tolist() == [[True, False, True]]


def test_dispersion_and_filtered_fraction_by_hand():
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 4.0]])
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    disp = prefix_dispersion(emb, codes, skip_padding=False)
    total = float(((emb - emb.mean(0)) ** 2).sum(1).mean())
    assert disp == pytest.approx([total, (1.0 + 4.0) / 2, 0.0])
    assert front_greater_weights(disp)[0] > front_greater_weights(disp)[1] > 0
    assert sum(front_greater_weights(disp)) == pytest.approx(2.0)
    assert filtered_fraction(codes) == pytest.approx([0.5, 0.5])
    # an all-zero padding row first is skipped automatically
    padded = prefix_dispersion(torch.cat([torch.zeros(1, 2), emb]), torch.cat([torch.zeros(1, 2).long(), codes + 1]))
    assert padded == pytest.approx(disp)


# ---- the pipeline on a generated RecBole dataset -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_recbole(tmp_path_factory):
    """A tiny atomic dataset (items 3 and 4 without text) loaded through RecBole; cache in a temp dir."""
    from recbole.data import create_dataset

    from recbole_genrec.quick_start import load_config

    root = tmp_path_factory.mktemp("sid_data")
    write_atomic_dataset(str(root), name="tiny", missing_text_items=(3, 4))
    cache = tmp_path_factory.mktemp("sid_cache")
    config = load_config(model="SASRec", dataset="tiny", config_dict=tiny_config_dict(
        root, cache_dir=str(cache), tokenizer="rqkmeans", codebook_size=4, num_codebooks=2, device="cpu"))
    return config, create_dataset(config), root, cache


def test_pipeline_cache_round_trip_and_corruption(tiny_recbole, caplog):
    config, dataset, _, cache = tiny_recbole
    first = build_semantic_ids(config, dataset)
    n = dataset.item_num
    assert first.codes.shape == (n, first.num_layers) and first.num_layers == len(first.codebook_sizes) == 3
    assert not first.codes[0].any() and is_unique(first.codes[1:])
    assert first.embeddings.shape[0] == n and not first.embeddings[0].any()
    assert [s.shape for s in first.soft_probs[:2]] == [(n, 4), (n, 4)] and first.soft_probs[2] is None
    assert not first.report["from_cache"] and len(first.report["prefix_dispersion"]) == 4
    assert first.trie.lookup(first.codes[1:]).tolist() == list(range(1, n))
    json.dumps(first.report)

    # items 3 and 4 have no text: they fall back to their item token and still get IDs
    ids = dataset.token2id(dataset.iid_field, ["3", "4"])
    assert [first.texts[i] for i in ids] == ["item 3", "item 4"]

    second = build_semantic_ids(config, dataset)
    assert second.report["from_cache"] and torch.equal(second.codes, first.codes)
    assert torch.equal(second.embeddings, first.embeddings)

    codes_file = next((cache / "semantic_ids" / "tiny").glob("codes-*.safetensors"))
    emb_file = next((cache / "semantic_ids" / "tiny").glob("embeddings-*.safetensors"))
    data = bytearray(codes_file.read_bytes())
    data[-3] ^= 0xFF
    codes_file.write_bytes(bytes(data))
    emb_file.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        third = build_semantic_ids(config, dataset)
    assert "checksum mismatch" in caplog.text
    assert not third.report["from_cache"] and not third.report["embeddings_from_cache"]
    assert torch.equal(third.codes, first.codes)
    assert build_semantic_ids(config, dataset).report["from_cache"]  # the rebuilt cache is valid again


def test_pipeline_reassign_and_bad_settings(tiny_recbole):
    config, dataset, _, _ = tiny_recbole
    config["collision"] = "reassign"
    config["codebook_size"] = 8
    try:
        sids = build_semantic_ids(config, dataset)
        assert sids.codes.shape[1] == 2 and is_unique(sids.codes[1:])
        config["text_fields"] = ["movie_title", "plot"]
        with pytest.raises(GenRecError, match=r"\['plot'\].*item fields are"):
            build_semantic_ids(config, dataset)
        config["text_fields"] = ["movie_title"]
        config["text_encoder"] = "/nonexistent/encoder"
        with pytest.raises(GenRecError, match="text_encoder"):
            build_semantic_ids(config, dataset)
        config["text_encoder"] = "all-MiniLM-L6-v2"
        config["tokenizer"] = "vqgan"
        with pytest.raises(GenRecError, match="unknown tokenizer"):
            build_semantic_ids(config, dataset)
    finally:
        config["collision"], config["codebook_size"], config["tokenizer"] = "append", 4, "rqkmeans"
        config["text_fields"] = ["movie_title", "release_year", "class"]


def test_cli_success_and_one_line_errors(tiny_recbole, capsys):
    from recbole_genrec.build_ids import main

    _, _, root, cache = tiny_recbole
    base = [f"--data_path={root}", "--dataset=tiny", f"--cache_dir={cache}", "--tokenizer=pq",
            "--codebook_size=4", "--num_codebooks=2", "--show_progress=False", "--device=cpu"]
    assert main(base) == 0
    assert "collisions before resolution" in capsys.readouterr().out
    for bad in (base + ["--tokenizer=nope"], base + ["--collision=drop"], base + ["oops"],
                base + ["--text_encoder=/no/such/dir"]):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "Traceback" not in "".join(err)


def test_item_text_same_before_and_after_data_preparation(tiny_recbole):
    """Models pass ``train_data._dataset`` (item_feat as an Interaction): the texts, hence the cache, match."""
    from recbole.data import data_preparation

    from recbole_genrec.data.item_text import item_texts

    config, dataset, _, _ = tiny_recbole
    before = item_texts(config, dataset)
    train_data, _, _ = data_preparation(config, dataset)
    after = item_texts(config, train_data._dataset)
    assert before == after and before[0] == "" and len(before) == dataset.item_num
    assert any(t.startswith("Movie number") for t in before)
