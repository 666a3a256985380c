"""Progress bars (RecBole style, switched by show_progress) and per-phase seconds of the long setup phases."""
import pytest
import torch

from recbole_genrec import utils
from recbole_genrec.data.semantic_ids import fit_codes

TINY_RQVAE = dict(num_layers=2, codebook_size=8, seed=3, kmeans_iters=10, latent_dim=4, hidden_dims=[16], epochs=5,
                  lr=3e-3, batch_size=64, commitment=0.25)


@pytest.fixture
def progress_on():
    utils.set_show_progress(True)
    yield
    utils.set_show_progress(False)


def test_progress_is_silent_unless_switched_on(capsys):
    utils.set_show_progress(False)  # a run earlier in this process may have switched it on
    assert list(utils.progress(range(3), desc="quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(utils.progress(range(3), desc="loud", show=True)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "loud" in err and "3/3" in err and "<" in err  # tqdm's [elapsed<remaining (ETA)]


@pytest.mark.parametrize("name, unit", [("rqvae", "epoch"), ("rqkmeans", "layer"), ("pq", "segment")])
def test_tokenizer_fits_show_progress_and_record_their_seconds(progress_on, capsys, name, unit):
    utils.phase_timings(reset=True)
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    settings = {"tokenizer": name, **TINY_RQVAE} if name == "rqvae" else {
        "tokenizer": name, "num_layers": 2, "codebook_size": 8, "seed": 3, "kmeans_iters": 10}
    fit_codes(x, settings, "append")
    err = capsys.readouterr().err
    assert name in err and unit in err
    phases = utils.phase_timings(reset=True)
    assert phases[f"tokenizer_fit:{name}"] > 0 and utils.phase_timings() == {}


def test_nested_phases_add_up():
    utils.phase_timings(reset=True)
    with utils.timed_phase("outer"):
        for _ in range(2):
            with utils.timed_phase("inner"):
                pass
    phases = utils.phase_timings(reset=True)
    assert set(phases) == {"outer", "inner"} and phases["outer"] >= phases["inner"] >= 0
