"""SimGR: item vectors, full-softmax loss, full ranking, added tokens, backbones (tiny BERT / GPT-2 built
from config and saved to tmp dirs), LoRA, aggregators, sampling and the optimizer/scheduler."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config_dict, write_atomic_dataset

torch.set_num_threads(1)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "next", "item", ":", "the", "user", "history", "<|eos|>", ","]
TEMPLATE = "next item : {history} the user"


def _word_tokenizer(bert_style):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|eos|>")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    _word_tokenizer(bert_style=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=10, eos_token_id=10)
    GPT2LMHeadModel(config).save_pretrained(path)
    _word_tokenizer(bert_style=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("simgr_data")
    write_atomic_dataset(str(root), name="tiny")
    return str(root)


def simgr_config(data_path, llm_path, **overrides):
    settings = dict(llm_path=llm_path, sid_source="random", random_sid_sizes=[4, 4, 3],
                    prompt_template=TEMPLATE, train_batch_size=8, effective_batch_size=16, device="cpu",
                    checkpoint_dir=str(__import__("tempfile").mkdtemp()))
    settings.update(overrides)
    return tiny_config_dict(data_path, **settings)


def build(data_path, llm_path, **overrides):
    from recbole.data import create_dataset, data_preparation

    from recbole_genrec.config import Config

    config = Config(model="SimGR", dataset="tiny", config_dict=simgr_config(data_path, llm_path, **overrides))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = config.model_class(config, train._dataset)
    return config, model, train, valid, test


def first_batch(loader):
    for batch in loader:
        return batch


@pytest.fixture(scope="module")
def bert_model(tiny_data, tiny_bert_dir):
    return build(tiny_data, tiny_bert_dir)


# ---- item vectors, tokens, prompts -------------------------------------------------------------------
def test_item_vectors_are_mean_of_their_token_embeddings(bert_model):
    from recbole_genrec.model.simgr import code_token

    _, model, *_ = bert_model
    codes = torch.stack([model.item_token_ids[:, l] for l in range(model.num_code_layers)], dim=1)
    weight = model.embedding_matrix()
    model.eval()
    vectors = model.item_vectors()
    for item in range(1, model.n_items):
        tokens = model.tokenizer.convert_ids_to_tokens(codes[item].tolist())
        assert tokens[0].startswith("<a_") and tokens[1].startswith("<b_") and tokens[2].startswith("<c_")
        expected = weight[codes[item]].mean(dim=0)
        assert torch.allclose(vectors[item], expected, atol=1e-6)
    # the token table is what the codebooks say: item -> <a_c0>, <b_c1>, <c_c2>
    ids = model.tokenizer.convert_tokens_to_ids([code_token(l, 0) for l in range(3)])
    assert all(i >= len(WORDS) for i in ids)


def test_added_tokens_round_trip_through_the_tokenizer(bert_model):
    _, model, *_ = bert_model
    tok = model.tokenizer
    assert len(tok) == len(WORDS) + sum(model.codebook_sizes)
    assert model.embedding_matrix().shape[0] >= len(tok)
    for item in (1, 5, model.n_items - 1):
        ids = model.item_token_ids[item].tolist()
        text = "".join(tok.convert_ids_to_tokens(ids))
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids).replace(" ", "") == text
    assert len(set(map(tuple, model.item_token_ids[1:].tolist()))) == model.n_items - 1  # distinct items


def test_prompts_built_by_tensor_ops_equal_tokenizing_the_text(bert_model):
    _, model, train, *_ = bert_model
    batch = first_batch(train)
    ids, mask = model.build_prompts(batch["item_id_list"], batch["item_length"])
    for row in range(4):
        n = int(batch["item_length"][row])
        items = batch["item_id_list"][row, :n].tolist()[-model.prompt_max_items:]
        history = "".join(t for i in items for t in model.tokenizer.convert_ids_to_tokens(
            model.item_token_ids[i].tolist()))
        expected = model.tokenizer(TEMPLATE.replace("{history}", history))["input_ids"]
        assert ids[row, : int(mask[row].sum())].tolist() == expected
        assert mask[row, int(mask[row].sum()):].sum() == 0


# ---- loss and ranking -----------------------------------------------------------------------------------
def test_loss_is_cross_entropy_over_all_items(bert_model):
    _, model, train, *_ = bert_model
    model.eval()
    batch = first_batch(train)
    with torch.no_grad():
        loss = model.calculate_loss(batch)
        ids, mask = model.build_prompts(batch["item_id_list"], batch["item_length"])
        hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        user = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # mean pooling (encoder)
        item = model.embedding_matrix()[model.item_token_ids].mean(1)
        logits = user @ item[1:].t() / model.temperature  # every real item, padding excluded
        expected = F.cross_entropy(logits, batch["item_id"] - 1)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert model.temperature == pytest.approx(0.05)


def test_full_sort_predict_scores_every_item_with_one_matrix_product(bert_model):
    _, model, _, valid, _ = bert_model
    model.eval()
    interaction = first_batch(valid)[0]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        users = model(interaction["item_id_list"], interaction["item_length"])
    assert scores.shape == (len(interaction), model.n_items)
    assert torch.isfinite(scores[:, 1:]).all() and torch.isinf(scores[:, 0]).all()
    assert torch.allclose(scores[:, 1:], (users @ model.item_vectors().t())[:, 1:] / model.temperature, atol=1e-5)
    single = model.predict(interaction)
    assert torch.allclose(single, scores.gather(1, interaction["item_id"].unsqueeze(1)).squeeze(1), atol=1e-5)
    # every item can reach the top: ranking is over the whole item set (no beam, no pruning)
    assert torch.argsort(scores[0, 1:], descending=True).numel() == model.n_items - 1


def test_item_vectors_cached_in_eval_and_invalidated(bert_model):
    _, model, *_ = bert_model
    model.eval()
    first = model.item_vectors()
    assert model.item_vectors() is first
    model.train()
    assert model._item_cache is None and model.item_vectors().requires_grad
    model.eval()
    cached = model.item_vectors()
    model.load_state_dict(model.state_dict())
    assert model._item_cache is None and model.item_vectors() is not cached


# ---- end to end, backbones, errors -----------------------------------------------------------------------
def test_runs_end_to_end_with_a_causal_lm_directory(tiny_data, tiny_gpt2_dir, run_dirs):
    from recbole_genrec.quick_start import run_recbole_genrec

    record = run_recbole_genrec(model="SimGR", dataset="tiny", result_file=str(run_dirs / "r.json"),
                                config_dict=simgr_config(tiny_data, tiny_gpt2_dir, epochs=2, metrics=[
                                    "Hit", "NDCG", "Coverage", "Entropy", "PrefixMatch"]))
    assert record["extras"]["causal_lm"] is True and record["extras"]["pooling"] == "last"
    test = record["test_result"]
    assert 0.0 < test["coverage@10"] <= 1.0 and test["entropy@10"] > 0.0  # diversity metrics apply as is
    assert "prefixmatch@1" in test
    assert record["extras"]["train_examples_last_epoch"] == 40  # one prefix per user per epoch
    assert 0.0 <= record["test_result"]["ndcg@10"] <= 1.0
    assert record["timings"]["epochs_trained"] == 2
    assert len(record["timings"]["train_loss"]) == 2 and len(record["timings"]["valid_scores"]) == 2


def test_causal_lm_pools_the_last_real_token(tiny_data, tiny_gpt2_dir):
    _, model, train, *_ = build(tiny_data, tiny_gpt2_dir)
    model.eval()
    batch = first_batch(train)
    with torch.no_grad():
        users = model(batch["item_id_list"], batch["item_length"])
        ids, mask = model.build_prompts(batch["item_id_list"], batch["item_length"])
        row = int(torch.argmin(mask.sum(1)))  # a padded row
        alone = model.backbone(input_ids=ids[row:row + 1, : int(mask[row].sum())]).last_hidden_state[0, -1]
    assert torch.allclose(users[row], alone, atol=1e-5)


def test_missing_llm_path_is_a_one_line_error(tiny_data, tmp_path):
    from recbole_genrec.utils import GenRecError

    with pytest.raises(GenRecError) as err:
        build(tiny_data, str(tmp_path / "no_such_model"))
    assert "llm_path" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(GenRecError) as err:
        build(tiny_data, str(tmp_path / "broken"))
    assert "\n" not in str(err.value)


def test_missing_llm_path_on_the_command_line_exits_2(tiny_data, tmp_path, capsys, run_dirs):
    from recbole_genrec.quick_start import main

    code = main(["--model=SimGR", "--dataset=tiny", f"--data_path={tiny_data}", "--sid_source=random",
                 f"--llm_path={tmp_path / 'nowhere'}", "--state=WARNING", "--device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: llm_path")


@pytest.mark.parametrize("kind", ["concat", "proj_mean", "attention", "gating"])
def test_aggregators_start_as_the_mean_and_learn(kind):
    from recbole_genrec.model.simgr import Aggregator

    torch.manual_seed(0)
    emb = torch.randn(5, 3, 8, requires_grad=True)
    agg = Aggregator(kind, 3, 8)
    out = agg(emb)
    assert torch.allclose(out, emb.mean(1), atol=1e-5)
    out.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agg.parameters())


def test_aggregator_switch_and_lora(tiny_data, tiny_bert_dir):
    _, model, train, *_ = build(tiny_data, tiny_bert_dir, aggregator="gating", lora_r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("gate" in n for n in trainable)
    assert model.embedding_matrix().requires_grad  # the new semantic-ID rows learn
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("attention" in n for n in frozen)
    model.train()
    loss = model.calculate_loss(first_batch(train))
    loss.backward()
    assert model.embedding_matrix().grad is not None


def test_semantic_ids_come_from_the_shared_builder(tiny_data, tiny_bert_dir, monkeypatch):
    calls = []

    def fake_build(config, dataset):
        n = dataset.item_num
        codes = torch.stack([torch.arange(n) % 5, torch.arange(n) // 5 % 7], dim=1)
        codes[0] = 0
        calls.append(n)
        return types.SimpleNamespace(codes=codes, codebook_sizes=[5, 7], num_layers=2, report={"ok": 1})

    module = types.ModuleType("recbole_genrec.data.semantic_ids")
    module.build_semantic_ids = fake_build
    monkeypatch.setitem(sys.modules, "recbole_genrec.data.semantic_ids", module)
    _, model, *_ = build(tiny_data, tiny_bert_dir, sid_source="semantic")
    assert calls and model.codebook_sizes == [5, 7] and model.result_extras()["semantic_id_report"] == {"ok": 1}
    assert model.tokenizer.convert_ids_to_tokens(model.item_token_ids[12].tolist()) == ["<a_2>", "<b_2>"]


# ---- trainer: sampling, optimizer, schedule, accumulation ------------------------------------------------
def test_trainer_samples_prefixes_and_uses_adamw_cosine(tiny_data, tiny_bert_dir):
    from recbole_genrec.registry import get_trainer

    config, model, train, *_ = build(tiny_data, tiny_bert_dir, epochs=3)
    trainer = get_trainer(type(model), config)(config, model)
    dataset = train._dataset
    users = dataset.inter_feat["user_id"]
    one = trainer.epoch_indices(dataset, 0)
    assert len(one) == len(torch.unique(users)) and len(torch.unique(users[one])) == len(one)
    assert not torch.equal(one.sort().values, trainer.epoch_indices(dataset, 1).sort().values)
    config["train_prefixes_per_user"] = 0
    assert len(trainer.epoch_indices(dataset, 0)) == len(dataset)
    config["train_prefixes_per_user"] = 1

    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.01, 0.0}
    assert trainer.accumulation_steps == 2  # 16 / 8
    before = [p.detach().clone() for p in model.parameters()]
    trainer._attach_lr_schedule(train)  # fit() does this: the shared schedule (recbole_genrec/trainer/schedule.py)
    trainer._train_epoch(train, 0)
    steps = math.ceil(math.ceil(40 / 8) / 2)  # 40 users, micro 8, 2 per step
    assert trainer.lr_scheduler.last_epoch == steps
    lr = trainer.optimizer.param_groups[0]["lr"]
    total, warmup = 3 * steps, math.ceil(0.01 * 3 * steps)
    progress = (steps - warmup) / (total - warmup)
    assert lr == pytest.approx(config["learning_rate"] * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bfloat16_backbone_scores_in_float32(tiny_data, tiny_bert_dir):
    _, model, train, *_ = build(tiny_data, tiny_bert_dir, llm_dtype="bfloat16")
    assert model.embedding_matrix().dtype == torch.bfloat16
    model.eval()
    with torch.no_grad():
        loss = model.calculate_loss(first_batch(train))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_embedding_matrix_can_have_its_own_learning_rate(tiny_data, tiny_bert_dir):
    from recbole_genrec.registry import get_trainer

    config, model, *_ = build(tiny_data, tiny_bert_dir, embedding_learning_rate=0.01)
    trainer = get_trainer(type(model), config)(config, model)
    groups = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert groups[id(model.embedding_matrix())] == pytest.approx(0.01)
    assert sorted(set(groups.values())) == pytest.approx(sorted({config["learning_rate"], 0.01}))
