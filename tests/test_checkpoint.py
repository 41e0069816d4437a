"""Checkpoint files: the manifest covers every file, damage of any kind is a CheckpointError (never a different
model), names from the index stay inside the checkpoint, and save replaces a checkpoint atomically."""
import json
import os
import random
import shutil
import warnings

import pytest
import torch

from fixtures_llama import make_byte_tokenizer, make_tiny_llama, tiny_model_dir  # noqa: F401  (fixture)
from saliq import checkpoint as ckpt
from saliq import hf
from saliq.checkpoint import INDEX_NAME, MANIFEST_NAME, CheckpointError
from saliq.cli import describe_checkpoint, main
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec


def _quant_model(seed=0, bits=2, lora_rank=4):
    """Tiny LLaMA (hidden 64) with RTN QuantLinear layers and a random LoRA: fast to build, save and load."""
    model = make_tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    for block in hf.decoder_blocks(model):
        for name, lin in hf.block_linears(block).items():
            q = QuantLinear.from_linear(lin, QuantSpec(bits, 32))
            if lora_rank:
                q = QuantLinear(q.packed, q.bias, torch.randn(lora_rank, lin.in_features, generator=g) * 0.01,
                                torch.randn(lin.out_features, lora_rank, generator=g) * 0.01, 16.0, q.spec)
            hf.set_submodule(block, name, q)
    return model


def _manifest(ck):
    return json.loads((ck / MANIFEST_NAME).read_text())["files"]


def _resign(ck):
    """Rewrite the manifest for the files it lists: the checkpoint is then consistent, whatever was edited."""
    ckpt.build_manifest(ck, list(_manifest(ck)))


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small checkpoint (3 shards, tokenizer, generation config), its state and its description."""
    d = tmp_path_factory.mktemp("pristine") / "ck"
    model = _quant_model()
    hf.save(model, d, make_byte_tokenizer(), method="apiq", max_shard_bytes=35_000)
    return d, {k: v.clone() for k, v in model.state_dict().items()}, describe_checkpoint(d)


@pytest.fixture
def ck(pristine, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(pristine[0], d, symlinks=True)
    return d


def _shards(ck):
    return sorted(ck.glob("model-*.safetensors"))


# ---------------------------------------------------------------- the manifest
def test_the_manifest_covers_every_file_and_the_loader_checks_it(ck, pristine):
    files = _manifest(ck)
    on_disk = {p.name for p in ck.iterdir()} - {MANIFEST_NAME}
    assert set(files) == on_disk
    assert {"config.json", INDEX_NAME, "tokenizer.json", "generation_config.json"} <= set(files)
    assert len(_shards(ck)) == 3
    for name, e in files.items():
        assert e == {"bytes": (ck / name).stat().st_size, "sha256": ckpt._sha256(ck / name)}
    assert json.loads((ck / "config.json").read_text())["quantization_config"]["manifest"] == MANIFEST_NAME
    model, tok = hf.load(ck)
    assert _state_equal(model.state_dict(), pristine[1])
    assert tok("ab").input_ids == make_byte_tokenizer()("ab").input_ids
    info = describe_checkpoint(ck)
    assert info["bytes"] == sum(e["bytes"] for e in files.values()) + (ck / MANIFEST_NAME).stat().st_size
    assert info["bytes"] == hf.checkpoint_size(ck) and info["extra_files"] == [] and info["files"] == len(files) + 1
    assert info["verified"] == "all files (manifest)"
    assert info["quantized_weights"] == sum(m.in_features * m.out_features for m in model.modules()
                                            if isinstance(m, QuantLinear))


def _flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2))


def _drop_manifest_entry(ck, name):
    _edit_json(ck / MANIFEST_NAME, lambda m: m["files"].pop(name))


def _set_qc(**kw):
    return lambda c: c["quantization_config"].update(**kw)


def _set_module(**kw):
    """Edit the first quantized module's entry."""
    return lambda c: next(iter(c["quantization_config"]["modules"].values())).update(**kw)


# Damage the manifest must catch: every case fails in hf.load and in describe_checkpoint (saliq info).
DAMAGE = {
    "shard byte flipped": (lambda ck: _flip(_shards(ck)[1]), r"model-00002-of-00003.safetensors: its sha256"),
    "shard truncated": (lambda ck: _truncate(_shards(ck)[0]), r"model-00001-of-00003.safetensors: \d+ bytes, the "
                        r"manifest says \d+: the file is truncated"),
    "shard deleted": (lambda ck: _shards(ck)[2].unlink(), r"model-00003-of-00003.safetensors: .*missing"),
    "shard is a directory": (lambda ck: (_shards(ck)[2].unlink(), _shards(ck)[0].with_name(
        "model-00003-of-00003.safetensors").mkdir()), "not a regular file"),
    "shards swapped": (lambda ck: (os.rename(_shards(ck)[1], ck / "x"), os.rename(_shards(ck)[0], _shards(ck)[0]
                       .with_name("model-00002-of-00003.safetensors")), os.rename(ck / "x", ck /
                       "model-00001-of-00003.safetensors")), r"model-0000[12]-of-00003.safetensors: "),
    "lora_alpha x10": (lambda ck: _edit_json(ck / "config.json", _set_qc(lora_alpha=160.0)), r"config.json: "),
    "bits 2.0": (lambda ck: _edit_json(ck / "config.json", _set_qc(bits=2.0)), r"config.json: "),
    "config not JSON": (lambda ck: (ck / "config.json").write_text("{not json"), r"config.json: "),
    "tokenizer flipped": (lambda ck: _flip(ck / "tokenizer.json", 100), r"tokenizer.json: its sha256"),
    "generation config edited": (lambda ck: _edit_json(ck / "generation_config.json", lambda g: g.update(
        eos_token_id=7)), r"generation_config.json: "),
    "index without weight_map": (lambda ck: _edit_json(ck / INDEX_NAME, lambda i: i.pop("weight_map")),
                                 r"model.safetensors.index.json: "),
    "manifest deleted": (lambda ck: (ck / MANIFEST_NAME).unlink(), r"saliq-manifest.json: is missing"),
    "manifest truncated": (lambda ck: _truncate(ck / MANIFEST_NAME), r"saliq-manifest.json: .*not valid JSON"),
    "manifest without config": (lambda ck: _drop_manifest_entry(ck, "config.json"), r"no checksum for config.json"),
    "shard without checksum": (lambda ck: _drop_manifest_entry(ck, "model-00002-of-00003.safetensors"),
                               r"shard 'model-00002-of-00003.safetensors' has no checksum"),
    "manifest entry edited": (lambda ck: _edit_json(ck / MANIFEST_NAME, lambda m: m["files"]["tokenizer.json"]
                              .update(sha256="0" * 64)), r"tokenizer.json: its sha256"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoints_raise_one_line_errors_in_load_and_info(ck, case):
    damage, match = DAMAGE[case]
    damage(ck)
    for fn in (hf.load, describe_checkpoint, hf.load_model):
        with pytest.raises(CheckpointError, match=match) as exc:
            fn(ck)
        assert "\n" not in str(exc.value)


# Consistent checkpoints (manifest rewritten after the edit) that are still wrong: the deeper checks catch them.
def _move_a_tensor(index):
    k = next(k for k, v in index["weight_map"].items() if v.startswith("model-00003"))
    index["weight_map"][k] = "model-00001-of-00003.safetensors"


WRONG = {
    "bits 2.0": (lambda ck: _edit_json(ck / "config.json", _set_qc(bits=2.0)), r"bits=2.0", True),
    "bits as a string": (lambda ck: _edit_json(ck / "config.json", _set_qc(bits="2")), r"bits='2'", True),
    "group_size 16": (lambda ck: _edit_json(ck / "config.json", _set_qc(group_size=16)), r"group_size=16", True),
    "format_version 1.0": (lambda ck: _edit_json(ck / "config.json", _set_qc(format_version=1.0)), "version 1.0",
                           True),
    "lora_rank a string": (lambda ck: _edit_json(ck / "config.json", lambda c: next(iter(
        c["quantization_config"]["modules"].values())).update(lora_rank="4")), "lora_rank='4'", True),
    "no modules": (lambda ck: _edit_json(ck / "config.json", _set_qc(modules={})), "modules", True),
    "index without weight_map": (lambda ck: _edit_json(ck / INDEX_NAME, lambda i: i.pop("weight_map")),
                                 r"model.safetensors.index.json: has no weight_map", True),
    "weight_map not a mapping": (lambda ck: _edit_json(ck / INDEX_NAME, lambda i: i.update(weight_map=[1])),
                                 "has no weight_map", True),
    "tensor in the wrong shard": (lambda ck: _edit_json(ck / INDEX_NAME, _move_a_tensor), "holds other tensors",
                                  False),
    "unknown model type": (lambda ck: _edit_json(ck / "config.json", lambda c: c.update(model_type="nonsense")),
                           "cannot be built", False),
    "bits 3 on 2-bit tensors": (lambda ck: _edit_json(ck / "config.json", _set_module(bits=3)), "shape", False),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_consistent_but_wrong_checkpoints_are_refused(ck, case):
    edit, match, info_too = WRONG[case]
    edit(ck)
    _resign(ck)
    with pytest.raises(CheckpointError, match=match):
        hf.load(ck)
    if info_too:
        with pytest.raises(CheckpointError, match=match):
            describe_checkpoint(ck)


def test_extra_files_are_ignored_by_the_loader_and_reported_by_info(ck, pristine):
    shutil.copy(_shards(ck)[0], ck / "stray.safetensors")
    (ck / "special_tokens_map.json").write_text("{not json")  # a tokenizer would choke on it if it read it
    (ck / "notes.txt").write_text("hello")
    (ck / ".calib").mkdir()
    model, tok = hf.load(ck)
    assert _state_equal(model.state_dict(), pristine[1]) and tok is not None
    info = describe_checkpoint(ck)
    assert info["extra_files"] == [".calib/", "notes.txt", "special_tokens_map.json", "stray.safetensors"]
    assert info["bytes"] == pristine[2]["bytes"] and info["packed_bits_per_weight"] == pristine[2][
        "packed_bits_per_weight"]


# ---------------------------------------------------------------- names stay inside the checkpoint
@pytest.fixture
def outside(tmp_path, pristine):
    """A valid shard outside the checkpoint (its hash is in the manifest: only the path check can refuse it)."""
    o = tmp_path / "other"
    o.mkdir()
    shutil.copy(sorted(pristine[0].glob("model-*.safetensors"))[0], o / "x.safetensors")
    return o / "x.safetensors"


def _point_shard_at(ck, name):
    """weight_map and manifest send shard 1's tensors to `name`, its manifest entry kept (checksum matches)."""
    first = "model-00001-of-00003.safetensors"
    _edit_json(ck / INDEX_NAME, lambda i: i["weight_map"].update(
        {k: name for k, v in i["weight_map"].items() if v == first}))

    def man(m):
        m["files"][name] = m["files"].pop(first)
    _edit_json(ck / MANIFEST_NAME, man)
    (ck / first).unlink()
    entry = _manifest(ck)
    _edit_json(ck / MANIFEST_NAME, lambda m: m["files"].update(
        {INDEX_NAME: {"bytes": (ck / INDEX_NAME).stat().st_size, "sha256": ckpt._sha256(ck / INDEX_NAME)}}))
    return entry


@pytest.fixture
def opened(monkeypatch):
    """Every path the checkpoint code stats or reads."""
    seen = []
    stat_regular, read_member = ckpt._stat_regular, ckpt._read_member
    monkeypatch.setattr(ckpt, "_stat_regular", lambda p, *a, **k: (seen.append(p), stat_regular(p, *a, **k))[1])
    monkeypatch.setattr(ckpt, "_read_member", lambda p, *a, **k: (seen.append(p), read_member(p, *a, **k))[1])
    return seen


@pytest.mark.parametrize("name", ["../other/x.safetensors", "ABS", "sub/../../other/x.safetensors",
                                  "./model.safetensors", "a\\..\\..\\x.safetensors"])
def test_index_names_that_leave_the_checkpoint_are_refused(ck, outside, opened, name):
    name = str(outside) if name == "ABS" else name
    _point_shard_at(ck, name)
    for fn in (hf.load, describe_checkpoint):
        with pytest.raises(CheckpointError, match="refusing to read it") as exc:
            fn(ck)
        assert repr(name) in str(exc.value)
    assert all(os.path.realpath(p).startswith(os.path.realpath(ck) + os.sep) for p in opened)


def test_system_files_named_by_the_index_are_never_opened(ck, opened):
    _edit_json(ck / INDEX_NAME, lambda i: i["weight_map"].update({"model.norm.weight": "/etc/passwd"}))
    _resign(ck)
    with pytest.raises(CheckpointError, match="'/etc/passwd' is not a relative path"):
        hf.load(ck)
    assert not any("passwd" in str(p) for p in opened)


def test_symlinks_out_of_the_checkpoint_are_refused_inside_ones_followed(ck, outside, pristine, opened):
    first = _shards(ck)[0]
    shutil.copy(first, outside)  # identical bytes: the checksum alone would accept it
    first.unlink()
    first.symlink_to(outside)
    for fn in (hf.load, describe_checkpoint):
        with pytest.raises(CheckpointError, match=r"'model-00001-of-00003.safetensors' is a symbolic link to .*"
                           "outside the checkpoint"):
            fn(ck)
    assert all(os.path.realpath(p).startswith(os.path.realpath(ck) + os.sep) for p in opened)
    (ck / "blobs").mkdir()
    first.unlink()
    shutil.copy(outside, ck / "blobs" / "abc")
    first.symlink_to(os.path.join("blobs", "abc"))  # inside: fine (hub-style layout within the directory)
    assert _state_equal(hf.load(ck)[0].state_dict(), pristine[1])


def test_a_config_or_manifest_symlinked_outside_is_refused(ck, tmp_path):
    for name in ("config.json", MANIFEST_NAME):
        d = tmp_path / f"c-{name}"
        shutil.copytree(ck, d)
        shutil.copy(d / name, tmp_path / name)
        (d / name).unlink()
        (d / name).symlink_to(tmp_path / name)
        with pytest.raises(CheckpointError, match="outside the checkpoint"):
            hf.load(d)


# ---------------------------------------------------------------- atomic save
def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_save_replaces_a_checkpoint_and_keeps_other_entries(ck, pristine, tmp_path):
    (ck / ".calib").mkdir()
    (ck / ".calib" / "state.json").write_text("{}")
    (ck / "notes.txt").write_text("mine")
    new = _quant_model(seed=1, bits=3, lora_rank=0)
    log = tmp_path / "log.jsonl"
    log.write_text('{"block": 0}\n')
    info = hf.save(new, ck, method="rtn", files={"calibration_log.jsonl": log})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "log.jsonl"]  # no temporary or old directory
    assert len(_shards(ck)) == 1 and not (ck / "tokenizer.json").exists()  # the old checkpoint's files are gone
    assert (ck / ".calib" / "state.json").read_text() == "{}" and (ck / "notes.txt").read_text() == "mine"
    assert "calibration_log.jsonl" in _manifest(ck) and info["bytes"] == hf.checkpoint_size(ck)
    model, tok = hf.load(ck)
    assert tok is None and _state_equal(model.state_dict(), new.state_dict())
    assert describe_checkpoint(ck)["extra_files"] == [".calib/", "notes.txt"]


@pytest.mark.parametrize("name", ["../x.txt", "/tmp/x.txt", "config.json", MANIFEST_NAME,
                                  "model-00001-of-00001.safetensors"])
def test_save_refuses_extra_file_names_outside_or_of_the_checkpoint(tmp_path, name):
    (tmp_path / "src.txt").write_text("x")
    with pytest.raises(ValueError):
        hf.save(_quant_model(lora_rank=0), tmp_path / "ck", files={name: tmp_path / "src.txt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.txt"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_old_checkpoint_intact(ck, pristine, tmp_path, monkeypatch, exc):
    (ck / ".calib").mkdir()
    (ck / ".calib" / "state.json").write_text("{}")
    before = _snapshot(ck)
    calls = []
    write_shard = ckpt._write_shard

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise exc
        write_shard(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "_write_shard", failing)
    with pytest.raises(type(exc)):
        hf.save(_quant_model(seed=1), ck, max_shard_bytes=35_000)
    assert len(calls) == 2 and calls[0].parent != ck  # it was writing elsewhere
    assert _snapshot(ck) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert _state_equal(hf.load(ck)[0].state_dict(), pristine[1])


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_write_shard", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        hf.save(_quant_model(), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_swap_puts_the_old_checkpoint_back(ck, pristine, tmp_path, monkeypatch):
    before = _snapshot(ck)
    rename = os.rename

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        hf.save(_quant_model(seed=1), ck)
    monkeypatch.undo()
    assert _snapshot(ck) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_refuses_to_replace_another_kind_of_model_or_the_current_directory(tiny_model_dir, ck, monkeypatch):
    before = _snapshot(tiny_model_dir)
    with pytest.raises(ValueError, match="not a saliq checkpoint"):
        hf.save(_quant_model(), tiny_model_dir)
    assert _snapshot(tiny_model_dir) == before
    monkeypatch.chdir(ck)
    with pytest.raises(ValueError, match="current directory"):
        hf.save(_quant_model(), ".")


# ---------------------------------------------------------------- checkpoints written before manifests
def _make_legacy(ck):
    """What saliq wrote before manifests: sha256 of each shard in the index metadata, nothing else checked."""
    files = _manifest(ck)
    (ck / MANIFEST_NAME).unlink()
    (ck / "generation_config.json").unlink()
    _edit_json(ck / "config.json", lambda c: c["quantization_config"].pop("manifest"))
    _edit_json(ck / INDEX_NAME, lambda i: i.update(metadata={"total_size": 0, "sha256": {
        n: e["sha256"] for n, e in files.items() if n.startswith("model-")}}))


def test_legacy_checkpoints_load_with_a_warning_and_verified_shards(ck, pristine):
    _make_legacy(ck)
    with pytest.warns(UserWarning, match="older saliq"):
        model, tok = hf.load(ck)
    assert _state_equal(model.state_dict(), pristine[1]) and tok is not None
    with pytest.warns(UserWarning):
        assert describe_checkpoint(ck)["verified"].startswith("legacy")
    _flip(_shards(ck)[0])
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="sha256 does not match the index"):
        warnings.simplefilter("ignore")
        hf.load(ck)


def test_legacy_checkpoints_need_every_shard_checksum_and_safe_names(ck, outside):
    _make_legacy(ck)
    _edit_json(ck / INDEX_NAME, lambda i: i["metadata"]["sha256"].pop("model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="'model-00002-of-00003.safetensors' has no sha256"):
        hf.load(ck)
    _edit_json(ck / INDEX_NAME, lambda i: i["weight_map"].update({"model.norm.weight": "../other/x.safetensors"}))
    with pytest.raises(CheckpointError, match="'../other/x.safetensors' leaves the checkpoint"):
        hf.load(ck)


def test_a_damaged_config_never_makes_load_model_read_a_plain_transformers_model(ck):
    _edit_json(ck / "config.json", lambda c: c.update(quantization_config={"quant_method": "other"}))
    with pytest.raises(CheckpointError, match="config.json: "):
        hf.load_model(ck)


# ---------------------------------------------------------------- the command line
def test_saliq_info_and_eval_fail_with_one_line_on_a_damaged_checkpoint(ck, tmp_path, capsys):
    assert main(["info", str(ck), "--json"]) == 0
    capsys.readouterr()
    _truncate(_shards(ck)[1], 0.9)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    for argv in (["info", str(ck)], ["eval", str(ck), "--text", str(text), "--seqlen", "16", "--no-progress"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model-00002-of-00003.safetensors" in err[0] and "truncated" in err[0]


# ---------------------------------------------------------------- fuzz
def _mutate(ck, rng: random.Random) -> str:
    names = sorted(p.name for p in ck.iterdir())
    name = rng.choice(names)
    data = bytearray((ck / name).read_bytes())
    if rng.random() < 0.7:
        at = rng.randrange(len(data))
        data[at] ^= rng.randrange(1, 256)
    else:
        data = data[: rng.randrange(len(data))]
    (ck / name).write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("seed", range(50))
def test_fuzz_byte_flips_and_truncations_never_load_a_different_model(pristine, tmp_path, seed):
    src, state, info = pristine
    d = tmp_path / "ck"
    shutil.copytree(src, d)
    name = _mutate(d, random.Random(seed))
    for fn in (hf.load, describe_checkpoint):
        try:
            out = fn(d)
        except CheckpointError as e:
            assert "\n" not in str(e)
            continue
        # only a change the manifest does not describe (e.g. JSON whitespace in the manifest) may load
        assert name == MANIFEST_NAME, f"{name} was damaged, yet {fn.__name__} accepted it"
        if fn is hf.load:
            assert _state_equal(out[0].state_dict(), state)
        else:
            assert {k: v for k, v in out.items() if k != "dir"} == {k: v for k, v in info.items() if k != "dir"}
