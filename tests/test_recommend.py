"""recommend: top-K per user or history from TIGER, SimGR and SASRec checkpoints (tiny data, seconds each)."""
import json

import pytest
import torch

from conftest import tiny_config_dict
from recbole_genrec.quick_start import run_recbole_genrec
from recbole_genrec.recommend import main, recommend, load_recommender
from recbole_genrec.utils import GenRecError
from test_tiger import TINY_TIGER, fake_sids  # noqa: F401  (fixture)

torch.set_num_threads(1)
TINY_SASREC = {"n_layers": 1, "n_heads": 1, "hidden_size": 16, "inner_size": 32, "device": "cpu"}


def train(model, data_path, name, run_dirs, **settings):
    record = run_recbole_genrec(model=model, dataset=name, config_dict=tiny_config_dict(data_path, **settings),
                                result_file=str(run_dirs / f"{model}.json"))
    assert isinstance(record["timings"]["phases"], dict)  # seconds per setup phase (none here: no real IDs)
    return record["checkpoint"]


@torch.no_grad()
def evaluation_topk(loaded, k):
    """Per user id: the test evaluation's top-k (full_sort_predict on the test loader, padding removed)."""
    config, dataset, (_, _, test), model = loaded
    ranking = {}
    for interaction, _history, _pos_u, _pos_i in test:
        scores = model.full_sort_predict(interaction.to(config["device"])).view(len(interaction), -1)
        scores[:, 0] = float("-inf")
        top = torch.topk(scores, k, dim=1).indices
        for uid, row in zip(interaction[dataset.uid_field].tolist(), top.tolist()):
            ranking[uid] = row
    return ranking


def test_tiger_checkpoint_cli_and_evaluation_ranking(tiny_dataset, run_dirs, fake_sids, capsys):  # noqa: F811
    data_path, name = tiny_dataset
    ckpt = train("TIGER", data_path, name, run_dirs, **TINY_TIGER)

    assert main([f"--checkpoint={ckpt}", "--user=3", "--user=5", "--topk=5", "--device=cpu",
                 f"--json={run_dirs / 'rec.json'}"]) == 0
    out = capsys.readouterr().out
    assert "user 3:" in out and "user 5:" in out and "semantic ID" in out and "Movie number" in out
    saved = json.loads((run_dirs / "rec.json").read_text())["results"]
    assert [r["user"] for r in saved] == ["3", "5"]
    for res in saved:
        assert len(res["recommendations"]) == 5
        first = res["recommendations"][0]
        assert len(first["semantic_id"]) == 3 and first["title"].startswith("Movie number")
        scores = [r["score"] for r in res["recommendations"] if r["score"] is not None]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)  # log-probabilities

    # --split=test reproduces the evaluation's ranking for each user
    loaded = load_recommender(ckpt, device="cpu")
    config, dataset, _, model = loaded
    expected = evaluation_topk(loaded, 10)
    for token in ("1", "3", "8"):
        uid = int(dataset.token2id(dataset.uid_field, token))
        res = recommend(ckpt, users=[token], topk=10, split="test", loaded=loaded)[0]
        got = [int(dataset.token2id(dataset.iid_field, r["item"])) for r in res["recommendations"]]
        assert got == expected[uid]

    # errors: one line, exit 2
    assert main([f"--checkpoint={ckpt}", "--user=no-such-user", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown user 'no-such-user'") and err.count("\n") == 1
    assert main([f"--checkpoint={ckpt}", "--history=1 999999", "--device=cpu"]) == 2
    assert "unknown item '999999'" in capsys.readouterr().err
    assert main([f"--checkpoint={run_dirs / 'missing.pth'}", "--user=1"]) == 2
    assert "not found" in capsys.readouterr().err


def test_sasrec_checkpoint_user_history_and_evaluation_ranking(tiny_dataset, run_dirs, capsys):
    data_path, name = tiny_dataset
    ckpt = train("SASRec", data_path, name, run_dirs, **TINY_SASREC)
    loaded = load_recommender(ckpt, device="cpu")
    _, dataset, _, _ = loaded
    expected = evaluation_topk(loaded, 10)
    for token in ("2", "7"):
        res = recommend(ckpt, users=token, topk=10, split="test", loaded=loaded)[0]
        got = [int(dataset.token2id(dataset.iid_field, r["item"])) for r in res["recommendations"]]
        assert got == expected[int(dataset.token2id(dataset.uid_field, token))]
        assert "score" not in res["recommendations"][0] and "semantic_id" not in res["recommendations"][0]

    # a user's full history = the test history plus the test item; --history with the same items agrees
    full = recommend(ckpt, users=["2"], topk=5, loaded=loaded)[0]
    test_hist = recommend(ckpt, users=["2"], topk=5, split="test", loaded=loaded)[0]["history"]
    assert [h["item"] for h in full["history"]][:-1][-len(test_hist):] == [h["item"] for h in test_hist]
    by_history = recommend(ckpt, history=" ".join(h["item"] for h in full["history"]), topk=5, loaded=loaded)[0]
    assert by_history["user"] is None
    assert [r["item"] for r in by_history["recommendations"]] == [r["item"] for r in full["recommendations"]]

    assert main([f"--checkpoint={ckpt}", "--history=3 4 5", "--topk=3", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "given history: model input of 3 items" in out and "top-3 from SASRec" in out
    with pytest.raises(GenRecError, match="either users"):
        recommend(ckpt, users=["1"], history="1 2", loaded=loaded)


def test_simgr_checkpoint(tmp_path_factory, tiny_dataset, run_dirs, capsys):
    from test_simgr import TEMPLATE, WORDS, _word_tokenizer
    from transformers import BertConfig, BertModel

    llm = tmp_path_factory.mktemp("rec_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128, pad_token_id=0)).save_pretrained(llm)
    _word_tokenizer(bert_style=True).save_pretrained(llm)
    data_path, name = tiny_dataset
    ckpt = train("SimGR", data_path, name, run_dirs, llm_path=str(llm), sid_source="random",
                 random_sid_sizes=[4, 4, 3], prompt_template=TEMPLATE, train_batch_size=16, device="cpu")
    assert main([f"--checkpoint={ckpt}", "--user=4", "--topk=4", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "user 4:" in out and "semantic ID" in out
    loaded = load_recommender(ckpt, device="cpu")
    _, dataset, _, _ = loaded
    res = recommend(ckpt, users=["4"], topk=10, split="test", loaded=loaded)[0]
    got = [int(dataset.token2id(dataset.iid_field, r["item"])) for r in res["recommendations"]]
    assert got == evaluation_topk(loaded, 10)[int(dataset.token2id(dataset.uid_field, "4"))]
    assert all(r["score"] is not None and len(r["semantic_id"]) == 3 for r in res["recommendations"])
