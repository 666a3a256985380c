"""Issue 16: every setting and dataset-file property ends in one line `error: ...` (exit code 2) before training;
pre-split benchmark datasets run; ties do not depend on the file's line order (docs/bad_input.md)."""
import os

import pytest
import torch

from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.quick_start import main, run_recbole_genrec
from recbole_genrec.utils import GenRecError
from tests.test_tiger import fake_semantic_ids


@pytest.fixture
def fake_sids(monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)


SMALL = ["--user_inter_num_interval=[0,inf)", "--item_inter_num_interval=[0,inf)"]
TIGER_TINY = ["--num_encoder_layers=1", "--num_decoder_layers=1", "--num_heads=2", "--d_kv=8", "--d_model=16",
              "--d_ff=32"]


def write(folder, name, ext, text):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, name, f"{name}.{ext}"), "w") as f:
        f.write(text)


def inter_rows(n_users=4, n_items=12, per_user=4, time_col="timestamp:float"):
    header = "user_id:token\titem_id:token" + (f"\t{time_col}" if time_col else "")
    rows = []
    for u in range(1, n_users + 1):
        for t in range(per_user):
            item = (u * 3 + t) % n_items + 1
            rows.append(f"{u}\t{item}" + (f"\t{u * 100 + t}" if time_col else ""))
    return header + "\n" + "\n".join(rows) + "\n"


# ---- files: (name, writer(folder, dataset), extra args, message) ----------------------------------
def _no_time(folder, name):
    write(folder, name, "inter", inter_rows(time_col=None))


def _time_named_time(folder, name):
    write(folder, name, "inter", inter_rows(time_col="time:float"))


def _price_dash(folder, name):
    write(folder, name, "inter", inter_rows())
    write(folder, name, "item", "item_id:token\tprice:float\n" + "".join(
        f"{i}\t{'-' if i == 5 else i * 1.5}\n" for i in range(1, 13)))


def _rating_text(folder, name):
    write(folder, name, "inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          + "".join(f"{u}\t{i}\t{'five' if (u, i) == (2, 3) else 4}\t{u * 10 + i}\n"
                    for u in range(1, 4) for i in range(1, 5)))


def _empty(folder, name):
    write(folder, name, "inter", "")


def _header_only(folder, name):
    write(folder, name, "inter", "user_id:token\titem_id:token\ttimestamp:float\n")


def _bad_type(folder, name):
    write(folder, name, "inter", inter_rows().replace("item_id:token", "item_id:int"))


def _no_item_col(folder, name):
    write(folder, name, "inter", inter_rows().replace("item_id:token", "movie:token"))


def _item_file_without_id(folder, name):
    write(folder, name, "inter", inter_rows())
    write(folder, name, "item", "movie:token\ttitle:token_seq\n1\ta b\n")


def _comma_separated(folder, name):
    write(folder, name, "inter", inter_rows().replace("\t", ","))


def _few_items(folder, name):
    write(folder, name, "inter", inter_rows())  # 12 items


FILE_CASES = [
    ("no-time-column", _no_time, [], "TIME_FIELD='timestamp' is not a column of"),
    ("time-column-named-time", _time_named_time, [], "set --TIME_FIELD=time"),
    ("dash-in-float-item-column", _price_dash, [], "column 'price' (float) holds '-' on line 6"),
    ("text-in-float-inter-column", _rating_text, [], "column 'rating' (float) holds 'five'"),
    ("empty-inter-file", _empty, [], ".inter is empty"),
    ("header-only-inter-file", _header_only, [], "has a header but no interactions"),
    ("unknown-column-type", _bad_type, [], "header column 'item_id:int' is not NAME:TYPE"),
    ("no-item-id-column", _no_item_col, [], "ITEM_ID_FIELD='item_id' is not a column"),
    ("item-file-without-item-id", _item_file_without_id, [], "has no ITEM_ID_FIELD column 'item_id'"),
    ("wrong-field-separator", _comma_separated, [], "is not NAME:TYPE"),
    ("topk-larger-than-catalogue", _few_items, [], "topk K=20 exceeds the 12 items"),
    ("benchmark-files-missing", _few_items, ["--benchmark_filename=['train','valid','test']"],
     "benchmark_filename=['train', 'valid', 'test'] needs"),
    ("load-col-unknown-column", _few_items, ["--load_col={'inter':['user_id','item_id','timestamp','rating']}"],
     "load_col names ['rating']"),
    ("load-col-drops-time", _few_items, ["--load_col={'inter':['user_id','item_id']}"],
     "TIME_FIELD='timestamp' is left out by load_col"),
    ("filtering-removes-everything", _few_items, ["--user_inter_num_interval=[50,inf)"],
     "no interactions of"),
]

# ---- settings on the learnable tiny dataset: (args, message) ---------------------------------------
SETTING_CASES = [
    (["--learning_rate=-1"], "learning_rate must be a number > 0"),
    (["--learning_rate=0"], "learning_rate must be a number > 0"),
    (["--train_batch_size=0"], "train_batch_size must be an integer >= 1"),
    (["--eval_batch_size=-3"], "eval_batch_size must be an integer >= 1"),
    (["--MAX_ITEM_LIST_LENGTH=0"], "MAX_ITEM_LIST_LENGTH must be an integer >= 1"),
    (["--MAX_ITEM_LIST_LENGTH=abc"], "config key 'MAX_ITEM_LIST_LENGTH' expects int"),
    (["--epochs=0"], "epochs must be an integer >= 1"),
    (["--epochs=1.5"], "config key 'epochs' expects int"),
    (["--stopping_step=0"], "stopping_step must be an integer >= 1"),
    (["--eval_step=-1"], "eval_step must be an integer >= 0"),
    (["--weight_decay=-0.1"], "weight_decay must be a number >= 0"),
    (["--seed=-1"], "seed must be an integer >= 0"),
    (["--hidden_dropout_prob=1.5"], "hidden_dropout_prob must be a number in [0, 1)"),
    (["--hidden_size=65", "--n_heads=2"], "hidden_size=65 is not a multiple of n_heads=2"),
    (["--n_layers=0"], "n_layers must be an integer >= 1"),
    (["--topk=[0,10]"], "topk must be a positive integer"),
    (["--topk=[50]", "--valid_metric=Hit@50"], "topk K=50 exceeds the 30 items"),
    (["--metrics=['Hit','Foo']"], "There is no metric named 'Foo'"),
    (["--user_inter_num_interval=[5,inf"], "user_inter_num_interval must be an interval"),
    (["--eval_args={'order':'XO'}"], "eval_args order must be 'TO'"),
    (["--eval_args={'split':{'LS':'bad'}}"], "eval_args split LS must be one of"),
    (["--eval_args={'mode':'weird'}"], "the mode [weird] in eval_args is not supported"),
    (["--benchmark_filename=['train','test']"], "benchmark_filename must list the train, valid and test"),
    (["--load_col={'item':['item_id']}"], "loads nothing from the .inter file"),
    (["--TIME_FIELD=time"], "TIME_FIELD='time' is not a column of tiny.inter"),
    (["--USER_ID_FIELD=uid"], "USER_ID_FIELD='uid' is not a column of tiny.inter"),
    (["--resume=missing.pth"], "--resume='missing.pth': no such checkpoint file"),
    (["--lr_scheduler=cyclic"], "lr_scheduler must be one of"),
    (["--warmup_ratio=1.5"], "warmup_ratio must be a number in [0, 1)"),
    (["--precision=fp8"], "precision must be one of"),
    (["--model=TIGER", "--beam_size=5"], "beam_size=5 is smaller than max(topk)=20"),
    (["--model=TIGER", "--train_prefix_keep=0"], "train_prefix_keep must be a number in (0, 1]"),
    (["--model=TIGER", "--num_heads=0"], "num_heads must be an integer >= 1"),
    (["--model=TIGER", "--d_model=0"], "d_model must be an integer >= 1"),
    (["--model=TIGER", "--codebook_size=1"], "codebook_size must be an integer >= 2"),
    (["--model=TIGER", "--beam_batch_size=0"], "beam_batch_size must be an integer >= 1"),
    (["--model=TIGER", "--dropout_rate=-0.1"], "dropout_rate must be a number in [0, 1)"),
    (["--model=TIGER", "--collision=reassign", "--codebook_size=2", "--num_codebooks=2"],
     "4 IDs cannot name 30 items with collision=reassign"),
]


def run_cli(args, capsys):
    code = main(args + ["--state=WARNING", "--show_progress=False"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
    return code, err


@pytest.mark.parametrize("case, writer, extra, message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_dataset_files_end_in_one_line(tmp_path, run_dirs, capsys, case, writer, extra, message):
    writer(str(tmp_path / "data"), "bad")
    args = ["--model=SASRec", "--dataset=bad", f"--data_path={tmp_path / 'data'}", "--epochs=1"]
    if not any(a.startswith("--user_inter_num_interval") for a in extra):
        args += SMALL
    else:
        args += ["--item_inter_num_interval=[0,inf)"]
    code, err = run_cli(args + extra, capsys)
    assert code == 2 and len(err) == 1, err
    assert message in err[0], err[0]
    assert not list(run_dirs.glob("saved/*.pth"))  # nothing trained


@pytest.mark.parametrize("args, message", SETTING_CASES, ids=[" ".join(a) for a, _ in SETTING_CASES])
def test_bad_settings_end_in_one_line(tiny_dataset, run_dirs, capsys, args, message):
    data_path, name = tiny_dataset
    model = [] if any(a.startswith("--model=") for a in args) else ["--model=SASRec"]
    epochs = [] if any(a.startswith("--epochs=") for a in args) else ["--epochs=1"]
    code, err = run_cli(model + args + epochs + [f"--dataset={name}", f"--data_path={data_path}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert message in err[0], err[0]
    assert not list(run_dirs.glob("saved/*.pth"))


def test_the_table_has_at_least_30_rows():
    assert len(FILE_CASES) + len(SETTING_CASES) >= 30


def test_every_run_path_shares_the_checks(tiny_dataset, run_dirs):
    """Library calls (and through them Ray trials and comparisons, which build the same Config) check too."""
    from recbole_genrec.compare import run_comparison

    data_path, name = tiny_dataset
    with pytest.raises(GenRecError, match="learning_rate must be"):
        run_recbole_genrec("SASRec", name, config_dict={"data_path": data_path, "learning_rate": -1})
    with pytest.raises(GenRecError, match="topk K=50 exceeds"):
        run_comparison(["Pop", "SASRec"], name, config_dict={"data_path": data_path, "topk": [50],
                                                             "valid_metric": "Hit@50", "epochs": 1})


# ---- case 4: RecBole's pre-split benchmark files ---------------------------------------------------
def write_benchmark(folder, name="bench", n_items=12):
    import random

    rng = random.Random(0)
    for part, n in (("train", 40), ("valid", 8), ("test", 8)):
        lines = ["session_id:token\titem_id_list:token_seq\titem_id:token"]
        for s in range(n):
            length = 6 if s % 3 == 0 else rng.randint(1, 6)
            start = rng.randint(1, n_items)
            seq = [(start + j - 1) % n_items + 1 for j in range(length + 1)]
            lines.append(f"{part}{s}\t{' '.join(map(str, seq[:-1]))}\t{seq[-1]}")
        write(folder, name, f"{part}.inter", "\n".join(lines) + "\n")


BENCH = ["--benchmark_filename=['train','valid','test']", "--USER_ID_FIELD=session_id",
         "--alias_of_item_id=['item_id_list']", "--MAX_ITEM_LIST_LENGTH=3", "--topk=[5,10]", *SMALL]


def test_pre_split_benchmark_runs_sasrec_from_the_cli(tmp_path, run_dirs, capsys):
    write_benchmark(str(tmp_path / "data"))
    code = main(["--model=SASRec", "--dataset=bench", f"--data_path={tmp_path / 'data'}", "--epochs=1",
                 "--state=WARNING", "--show_progress=False", f"--result_file={tmp_path / 'r.json'}", *BENCH])
    assert code == 0, capsys.readouterr().err
    assert "test result" in capsys.readouterr().out


def test_pre_split_benchmark_histories_keep_their_most_recent_items(tmp_path, run_dirs, fake_sids):
    from recbole_genrec.config import parse_cmd_args
    from recbole_genrec.quick_start import load_config, prepare_data

    write_benchmark(str(tmp_path / "data"))
    raw = open(tmp_path / "data" / "bench" / "bench.train.inter").read().splitlines()[1:]
    config = load_config("TIGER", "bench", cmd_args=[f"--data_path={tmp_path / 'data'}", "--epochs=1", "--seed=7",
                                                      "--beam_size=10", "--state=WARNING", *BENCH, *TIGER_TINY])
    dataset, train, valid, test = prepare_data(config)
    seq_field, len_field = dataset.item_id_list_field, dataset.item_list_length_field
    inter = train.dataset.inter_feat
    assert inter[seq_field].shape[1] == 3 and int(inter[len_field].max()) == 3
    tokens = dataset.field2id_token[dataset.iid_field]
    first = raw[0].split("\t")[1].split()  # a 6-item history
    kept = [tokens[i] for i in inter[seq_field][0].tolist()[: int(inter[len_field][0])]]
    assert len(first) == 6 and kept == first[-3:]
    record = run_recbole_genrec(prepared=(config, dataset, train, valid, test), saved=False,
                                result_file=str(tmp_path / "tiger.json"))
    assert set(record["test_result"]) >= {"hit@5", "ndcg@10"}


# ---- case 5: ties do not depend on the order of the file's lines -----------------------------------
TIES = [("u1", "A"), ("u1", "B"), ("u1", "C"), ("u1", "D"), ("u2", "C"), ("u2", "D"), ("u2", "E"), ("u2", "F"),
        ("u3", "E"), ("u3", "F"), ("u3", "A"), ("u3", "B")]


def test_pop_ties_do_not_depend_on_line_order(tmp_path, run_dirs, capsys):
    import json

    rows = [f"{u}\t{i}\t{t}" for t, (u, i) in enumerate(TIES, 1)]
    header = "user_id:token\titem_id:token\ttimestamp:float\n"
    write(str(tmp_path / "data"), "fwd", "inter", header + "\n".join(rows) + "\n")
    write(str(tmp_path / "data"), "rev", "inter", header + "\n".join(reversed(rows)) + "\n")
    results = {}
    for name in ("fwd", "rev"):
        for seed in (1, 2):
            out = tmp_path / f"{name}{seed}.json"
            assert main(["--model=Pop", f"--dataset={name}", f"--data_path={tmp_path / 'data'}", "--topk=[1]",
                         "--valid_metric=Hit@1", f"--seed={seed}", "--epochs=1", "--state=WARNING",
                         "--show_progress=False", f"--result_file={out}", *SMALL]) == 0
            results[name, seed] = json.loads(out.read_text())["test_result"]["hit@1"]
    assert results["fwd", 1] == results["rev", 1] and results["fwd", 2] == results["rev", 2]
    assert {results["fwd", 1], results["fwd", 2]} <= {0.0, 0.3333, 0.6667, 1.0}


def test_tie_break_is_a_uniform_random_order_over_seeds():
    """Each user's target ties with two other items (as in the data above): Hit@1 is 1/3 in expectation."""
    from recbole_genrec.evaluator.scores import tie_broken_topk, tie_order

    tokens = ["[PAD]", "A", "B", "C", "D", "E", "F"]
    scores = torch.tensor([[float("-inf"), -1e9, -1e9, -1e9, 1.0, 1.0, 1.0]])  # u1: D (target), E, F tie
    hits = [int(tie_broken_topk(scores, 1, tie_order(tokens, seed))[0, 0] == 4) for seed in range(600)]
    assert abs(sum(hits) / len(hits) - 1 / 3) < 0.06
    shuffled = [tokens[0]] + tokens[1:][::-1]  # other internal ids for the same raw tokens
    for seed in range(20):
        a = [tokens[i] for i in tie_order(tokens, seed).tolist()]
        b = [shuffled[i] for i in tie_order(shuffled, seed).tolist()]
        assert a == b


def test_beam_fill_follows_the_tie_order():
    from recbole_genrec.evaluator.scores import beam_scores_to_full, fill_scores, tie_order

    order = tie_order(["[PAD]", "x", "y", "z", "w"], 3)
    fill = fill_scores(5, order=order)
    out = beam_scores_to_full(torch.tensor([[2, 0]]), torch.tensor([[-0.5, float("-inf")]]), 5, fill=fill)
    ranked = torch.sort(out[0], descending=True, stable=True).indices.tolist()
    assert ranked[0] == 2 and ranked[1:] == [i for i in order.tolist() if i != 2]


# ---- case 7: the decoder uses transformers' current cache API ---------------------------------------
def test_decoding_raises_no_deprecation_warning():
    import warnings

    from recbole_genrec.model.seq2seq import Seq2SeqBackbone, SemanticTokenLayout

    config = {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
              "dropout_rate": 0.0, "feed_forward_proj": "relu", "relative_attention_num_buckets": 8,
              "relative_attention_max_distance": 16, "attn_implementation": "eager"}
    layout = SemanticTokenLayout(torch.tensor([[0, 0], [1, 2], [0, 1]]), [3, 4])
    backbone = Seq2SeqBackbone(layout, config).eval()
    ids = torch.tensor([[3, 7, 2, 6]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hidden = backbone.encode(ids, ids != 0)
        out, cache = backbone.decode(torch.tensor([[0]]), hidden, ids != 0, use_cache=True)
        backbone.decode(torch.tensor([[3]]), hidden, ids != 0, past_key_values=cache, use_cache=True)
    assert out.shape == (1, 1, 16) and cache is not None
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations
