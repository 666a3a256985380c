"""Several processes (issue 17): 2 ranks with gloo on the CPU, tiny generated data. Training completes for a
stock model (SASRec) and the plugin's TIGER, ETEGRec (alternating phases, ID refresh broadcast) and SimGR
(its own loop); only rank 0 writes results; the evaluation of each final checkpoint equals a single-process
evaluation of the same checkpoint exactly; and the first optimizer step of 2 ranks equals a single-process
step on the same global batch (gradients averaged, then clipped)."""
import json
import os

import pytest
import torch

from conftest import tiny_config_dict, write_atomic_dataset
from test_simgr import TEMPLATE, WORDS, _word_tokenizer

TINY_T5 = {"num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8, "d_model": 16, "d_ff": 32,
           "num_user_tokens": 7, "beam_size": 10, "device": "cpu"}
SIDS = {"tokenizer": "rqkmeans", "num_codebooks": 2, "codebook_size": 4, "kmeans_iters": 5}
METRICS = {"metrics": ["Hit", "NDCG"], "topk": [5, 10]}


def tiny_bert(path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).save_pretrained(path)
    _word_tokenizer(bert_style=True).save_pretrained(path)
    return str(path)


def jobs(data_path, bert_dir):
    base = dict(dataset="tiny", **METRICS)
    return [
        ("TIGER", "TIGER", tiny_config_dict(data_path, epochs=2, **TINY_T5, **SIDS, **{
            **base, "metrics": ["Hit", "NDCG", "HeadHit", "TailNDCG", "Coverage", "Entropy", "PrefixMatch"]})),
        ("ETEGRec", "ETEGRec", tiny_config_dict(data_path, epochs=2, **TINY_T5, **base, **{
            "use_user_token": True, "num_codebooks": 2, "codebook_size": 6, "rqvae_latent_dim": 4,
            "rqvae_hidden_dims": [16], "rqvae_epochs": 2, "rqvae_batch_size": 16, "kmeans_iters": 5,
            "collision_layer_size": 32, "align_warmup_epochs": 0, "learning_rate_tokenizer": 0.01})),
        ("SimGR", "SimGR", tiny_config_dict(data_path, epochs=1, llm_path=bert_dir, sid_source="random",
                                            random_sid_sizes=[4, 4, 3], prompt_template=TEMPLATE,
                                            train_batch_size=8, effective_batch_size=16, **base)),
    ]


def step_job(data_path):
    """TIGER without dropout, plain SGD, fixed order: one step is a deterministic function of the batch."""
    return ("TIGER", tiny_config_dict(data_path, dataset="tiny", shuffle=False, learner="sgd", learning_rate=0.5,
                                      train_batch_size=32, dropout_rate=0.0, attention_dropout=0.0, ffn_dropout=0.0,
                                      **TINY_T5, **SIDS, **METRICS))


def single_process_eval(checkpoint):
    """What benchmarks/eval_checkpoint.py does: rebuild the config from the checkpoint, one process."""
    from recbole_genrec.beam_analysis import config_from_checkpoint
    from recbole_genrec.quick_start import build_model_and_trainer, prepare_data
    from recbole_genrec.trainer import load_checkpoint

    config = config_from_checkpoint(load_checkpoint(checkpoint)["config"], {"show_progress": False})
    assert config["single_spec"]
    _, train, _, test = prepare_data(config)
    _, trainer = build_model_and_trainer(config, train)
    trainer.eval_collector.data_collect(train)  # item counts for head/tail metrics (RecBole's fit does this)
    return {k: float(v) for k, v in trainer.evaluate(test, model_file=checkpoint).items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every job in 2 spawned gloo processes (one process group, the jobs one after another)."""
    import torch.multiprocessing as mp

    from recbole_genrec import distributed
    from recbole_genrec.quick_start import main
    from tests.distributed_worker import rank_main

    root = tmp_path_factory.mktemp("ddp")
    old = os.getcwd()
    os.chdir(root)  # checkpoints, logs, caches and results stay in the temp dir (spawn keeps the cwd)
    try:
        # 41 users: RecBole's sampler would pad the evaluation shards by repeating a user
        data_path = write_atomic_dataset(str(root / "data"), name="tiny", n_users=41)
        bert_dir = tiny_bert(root / "bert")
        out = root / "out"
        out.mkdir()
        launch = {"nproc": 2, "world_size": 2, "offset": 0, "ip": "127.0.0.1", "port": distributed.free_port()}
        mp.spawn(rank_main, args=(launch, jobs(data_path, bert_dir), step_job(data_path), str(out)), nprocs=2,
                 join=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        # the command line: a stock RecBole model through --nproc=2 (spawned by quick_start.main)
        code = main(["--model=SASRec", "--dataset=tiny", f"--data_path={data_path}", "--nproc=2", "--epochs=2",
                     "--hidden_size=16", "--show_progress=False", "--metrics=['Hit','NDCG']", "--topk=[5,10]",
                     "--seed=7", f"--result_file={out / 'SASRec.json'}"])
        assert code == 0
        record = json.loads((out / "SASRec.json").read_text())
        for rank in ranks:
            rank["SASRec"] = {"test_result": record["test_result"], "checkpoint": record["checkpoint"],
                              "result_file": str(out / "SASRec.json")}
        ranks[1]["SASRec"]["result_file"] = None  # main reports rank 0's result only (checked below)
        yield {"root": root, "data_path": data_path, "out": out, "ranks": ranks}
    finally:
        os.chdir(old)


@pytest.mark.parametrize("name", ["SASRec", "TIGER", "ETEGRec", "SimGR"])
def test_two_rank_evaluation_equals_single_process_evaluation(two_ranks, name):
    rank0, rank1 = two_ranks["ranks"][0][name], two_ranks["ranks"][1][name]
    assert rank0["test_result"] == rank1["test_result"]  # every rank computed the metrics over all users
    old = os.getcwd()
    os.chdir(two_ranks["root"])
    try:
        single = single_process_eval(rank0["checkpoint"])
    finally:
        os.chdir(old)
    assert single == rank0["test_result"]
    assert single["hit@10"] > 0  # a trained model, not an empty evaluation


@pytest.mark.parametrize("name", ["SASRec", "TIGER", "ETEGRec", "SimGR"])
def test_only_rank_zero_writes(two_ranks, name):
    rank0, rank1 = two_ranks["ranks"][0][name], two_ranks["ranks"][1][name]
    assert rank1["result_file"] is None and rank0["result_file"] == str(two_ranks["out"] / f"{name}.json")
    record = json.loads((two_ranks["out"] / f"{name}.json").read_text())
    assert record["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert rank0["checkpoint"] == rank1["checkpoint"]  # one run name: rank 1 evaluated rank 0's checkpoint


def test_files_come_from_rank_zero_only(two_ranks):
    results = sorted(p.name for p in two_ranks["out"].glob("*.json") if not p.name.startswith("rank"))
    assert results == ["ETEGRec.json", "SASRec.json", "SimGR.json", "TIGER.json"]
    logs = "".join(p.read_text() for p in (two_ranks["root"] / "log").rglob("*.log"))
    assert "[rank 0/2]" in logs  # the log says which rank


@pytest.mark.parametrize("args, message", [
    (["--nproc=0"], "--nproc must be an integer >= 1"),
    (["--nproc=two"], "--nproc must be an integer"),
    (["--nproc=3", "--world_size=2"], "more than --world_size"),
    (["--nproc=2", "--world_size=4"], "same --ip="),
    (["--nproc=2", "--world_size=4", "--port=29400"], "same --ip="),
    (["--nproc=2", "--world_size=4", "--port=29400", "--offset=3"], "exceeds --world_size"),
    (["--nproc=2", "--port=99999"], "--port must be a TCP port"),
    (["--nproc=2", "--ddp_backend=nccl"], "ddp_backend=nccl needs CUDA"),
    (["--nproc=2", "--ddp_backend=mpi"], "ddp_backend must be one of"),
    (["--model=SASRec,Pop", "--nproc=2"], "one model at a time"),
])
def test_bad_launch_settings_end_before_any_process_starts(tmp_path, capsys, monkeypatch, args, message):
    from recbole_genrec.compare import main

    monkeypatch.chdir(tmp_path)
    data_path = write_atomic_dataset(str(tmp_path), name="tiny")
    model = [] if any(a.startswith("--model=") for a in args) else ["--model=SASRec"]
    code = main(model + ["--dataset=tiny", f"--data_path={data_path}", "--device=cpu", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_gradient_averaging_keeps_untouched_parameters_without_gradient(two_ranks):
    """No rank computed a gradient: it stays None (no weight decay or momentum on it, as in one process); only
    rank 0 did: the mean with rank 1's zeros; both did: the mean."""
    grads = two_ranks["ranks"][0]["_grads"]
    assert grads == two_ranks["ranks"][1]["_grads"]
    assert grads["untouched"] is None
    assert grads["rank0_only"] == [1.0, 1.0]  # rank 0's 2.0, rank 1 none
    assert grads["both"] == [2.0, 2.0]  # ranks 1.0 and 3.0


def test_first_step_of_two_ranks_equals_one_process_on_the_global_batch(two_ranks):
    from tests.distributed_worker import first_step_state

    assert two_ranks["ranks"][0]["_step_rows"] == two_ranks["ranks"][1]["_step_rows"] == 16  # 32 / 2 ranks
    old = os.getcwd()
    os.chdir(two_ranks["root"])
    try:
        name, config = step_job(two_ranks["data_path"])
        single, rows = first_step_state(name, config)
    finally:
        os.chdir(old)
    assert rows == 32
    ddp = torch.load(two_ranks["out"] / "step_state.pt", weights_only=True)
    assert single.keys() == ddp.keys()
    worst = max(float((single[k].float() - ddp[k].float()).abs().max()) for k in single if single[k].is_floating_point())
    assert worst < 1e-5, f"largest weight difference after one step: {worst}"


def test_torchrun_start(tmp_path):
    """``torchrun --nproc_per_node=2 run_recbole_genrec.py ...``: each process reads torchrun's environment."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_path = write_atomic_dataset(str(tmp_path / "data"), name="tiny", n_users=41)
    result = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           os.path.join(root, "run_recbole_genrec.py"), "--model=SASRec", "--dataset=tiny",
                           f"--data_path={data_path}", "--epochs=1", "--hidden_size=16", "--show_progress=False",
                           "--metrics=['Hit','NDCG']", "--topk=[5,10]", f"--result_file={result}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 1 done" in proc.stdout and f"result file: {result}" in proc.stdout
    record = json.loads(result.read_text())
    assert record["distributed"] == {"world_size": 2, "backend": "gloo"} and record["test_result"]["hit@10"] > 0
