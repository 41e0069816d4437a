import pytest
import torch

from saliq import data


def test_calibration_samples_are_seeded_windows_of_the_text():
    ids = torch.arange(1000)
    a = data.calibration_samples(ids, nsamples=8, seqlen=32, seed=42)
    b = data.calibration_samples(ids, nsamples=8, seqlen=32, seed=42)
    c = data.calibration_samples(ids, nsamples=8, seqlen=32, seed=7)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the text
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)
    assert int(a.max()) < 1000


def test_evaluation_windows_are_consecutive_and_drop_the_tail():
    ids = torch.arange(1000)
    w = data.evaluation_windows(ids, seqlen=300)
    assert w.shape == (3, 300)
    assert torch.equal(w.flatten(), torch.arange(900))
    assert data.evaluation_windows(ids, seqlen=100, max_tokens=250).shape == (2, 100)


@pytest.mark.parametrize("call, match", [
    (lambda: data.calibration_samples(torch.arange(10), 4, 32), "fewer than seqlen"),
    (lambda: data.calibration_samples(torch.arange(100), 0, 32), "nsamples=0"),
    (lambda: data.evaluation_windows(torch.arange(10), 32), "fewer than one window"),
    (lambda: data.evaluation_windows(torch.arange(10), 1), "seqlen=1"),
])
def test_bad_requests_say_what_to_change(call, match):
    with pytest.raises(data.DataError, match=match):
        call()


def test_unknown_source_asks_for_a_local_file(tmp_path):
    with pytest.raises(data.DataError, match="local UTF-8 text file"):
        data.read_text(str(tmp_path / "missing.txt"))


def test_hub_dataset_without_datasets_or_hub_asks_for_a_local_file(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(data.DataError, match="local text file"):
        data.read_text("wikitext2")


def test_local_file_is_tokenized_into_windows(tmp_path):
    from fixtures_llama import TEXT, make_byte_tokenizer

    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    tok = make_byte_tokenizer()
    cal = data.load_calibration(tok, str(p), nsamples=3, seqlen=16, seed=1)
    ev = data.load_evaluation(tok, str(p), seqlen=64)
    assert cal.shape == (3, 16) and ev.shape == (len(TEXT) // 64, 64)
    assert tok.decode(ev[0].tolist()) == TEXT[:64]
