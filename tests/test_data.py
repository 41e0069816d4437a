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


@pytest.mark.parametrize("payload, match", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4, r"is binary \(NUL byte at offset 7"),
    ("caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 20, r"not valid UTF-8 \(byte 0xe9 at offset 3"),
    ("plain text in UTF-16. ".encode("utf-16") * 10, r"UTF-16/32 \(byte-order mark fffe\)"),
    ("plain text in UTF-16 without a mark. ".encode("utf-16-le") * 10, "is binary"),
    (("text" + "\x01\x02\x1b\x7f" * 5) .encode() * 10, r"looks binary: 200 of its 240 characters"),
    (b"", "is empty"),
])
def test_binary_or_non_utf8_text_is_refused_naming_the_file(tmp_path, payload, match):
    p = tmp_path / "calib.txt"
    p.write_bytes(payload)
    with pytest.raises(data.DataError, match=match) as exc:
        data.read_text(str(p))
    assert str(p) in str(exc.value) and "pass a UTF-8 text file" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_utf8_text_with_a_byte_order_mark_and_a_few_control_characters_is_read(tmp_path):
    p = tmp_path / "t.txt"
    text = "Alice\tand the \u00e9l\u00e8ve\r\n\fpage two " * 30 + "\x1a"  # an old end-of-file mark
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert data.read_text(str(p)) == text  # the byte-order mark is dropped; whitespace and one control are fine
