"""lm-eval: `saliq eval --tasks`, lm-eval's own hf model and its command line (with saliq imported) score a local
multiple-choice task, and their accuracy equals the one computed here from summed log-probabilities."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data is a local JSON file
import lm_eval  # noqa: E402  (a dev dependency: pyproject's dev extra, installed by `make install`)

from fixtures_llama import make_byte_tokenizer  # noqa: E402
from quant_models import make_quant_llama  # noqa: E402
from saliq import hf  # noqa: E402
from saliq.cli import main  # noqa: E402

TASK = "saliq_local_mc"
DOCS = [{"question": q, "choices": c, "label": l} for q, c, l in [
    ("Where does the sun rise?", ["in the east", "west", "under the sea at night", "up"], 0),
    ("What do bees make?", ["honey", "steel beams", "bread", "clouds of thunder"], 0),
    ("Which is a colour?", ["seven", "blue", "a long winding road", "run"], 1),
    ("What is frozen water?", ["steam", "sand", "ice", "a sentence about glaciers"], 2),
    ("How many legs has a spider?", ["eight", "two", "none at all, ever", "six"], 0),
    ("What do you read?", ["a spoon", "a book", "the rain on a window pane", "salt"], 1),
]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = make_byte_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(0)  # lm-eval's hf model needs a prefix token
    hf.save(make_quant_llama(bits=4, lora_rank=4), root / "ck", tok, method="apiq")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'mc.jsonl'}
  cache_dir: {root / 'datasets-cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return root / "ck", tasks


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval indexes its thousands of built-in tasks (seconds) wherever a TaskManager is built without
    include_defaults=False, its command line included; these tests need only the local task."""
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))


def _by_hand(ck):
    """acc and acc_norm from the checkpoint's own logits: each choice scored by the summed log-probability of its
    tokens after the question (lm-eval's target delimiter, a space, before the choice); acc_norm divides by the
    choice's length in characters. Also the log-likelihoods, per document and choice."""
    model, tok = hf.load(ck)
    lls, acc, acc_norm = [], [], []
    for d in DOCS:
        ctx = f"Question: {d['question']}\nAnswer:"
        ctx_ids = tok(ctx).input_ids
        scores = []
        for choice in d["choices"]:
            ids = tok(ctx + " " + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
            scores.append(float(sum(logp[i - 1, ids[i]] for i in range(len(ctx_ids), len(ids)))))
        lls.append(scores)
        acc.append(float(max(range(4), key=lambda i: scores[i]) == d["label"]))
        norm = [s / len(c) for s, c in zip(scores, d["choices"])]
        acc_norm.append(float(max(range(4), key=lambda i: norm[i]) == d["label"]))
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm), lls


def test_saliq_eval_tasks_matches_accuracy_by_hand(setup, tmp_path, capsys):
    from saliq.lm_eval_support import evaluate_tasks

    ck, tasks = setup
    acc, acc_norm, lls = _by_hand(ck)
    assert 0 < acc < 1 or 0 < acc_norm < 1  # a task that separates right from wrong answers
    res = evaluate_tasks(ck, [TASK], include_path=tasks, log_samples=True)
    got = {(s["doc_id"], i): r[0] for s in res["samples"][TASK] for i, r in enumerate(s["filtered_resps"])}
    for doc_id, scores in enumerate(lls):
        for i, ll in enumerate(scores):
            assert got[(doc_id, i)] == pytest.approx(ll, abs=1e-4)
    assert res["results"][TASK]["acc,none"] == acc and res["results"][TASK]["acc_norm,none"] == acc_norm

    out = tmp_path / "results.json"
    assert main(["eval", str(ck), "--tasks", TASK, "--include-path", str(tasks), "--output", str(out), "--json",
                 "--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["results"][TASK]["acc"] == acc and line["results"][TASK]["acc_norm"] == acc_norm
    written = json.loads(out.read_text())
    assert written["results"][TASK]["acc,none"] == acc and written["saliq"]["quantization"]["bits"] == 4
    assert written["saliq"]["manifest_sha256"] and written["saliq"]["versions"]["lm_eval"]


def test_lm_evals_own_hf_model_and_command_line_load_saliq_checkpoints(setup, tmp_path, monkeypatch,
                                                                      local_tasks_only):
    from lm_eval.tasks import TaskManager

    from saliq import lm_eval_support

    ck, tasks = setup
    acc, acc_norm, _ = _by_hand(ck)
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(ck), "dtype": "float32"},
                                  device="cpu", tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)))
    assert res["results"][TASK]["acc,none"] == acc and res["results"][TASK]["acc_norm,none"] == acc_norm
    out = tmp_path / "lm-eval-out"
    monkeypatch.setattr("sys.argv", ["lm_eval", "run", "--model", "hf", "--model_args",
                                     f"pretrained={ck},dtype=float32", "--device", "cpu", "--tasks", TASK,
                                     "--include_path", str(tasks), "--output_path", str(out)])
    lm_eval_support.main()
    written = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert len(written) == 1 and written[0]["results"][TASK]["acc,none"] == acc


def test_eval_arguments_are_checked_before_any_work(setup, capsys, local_tasks_only):
    ck, tasks = setup
    for argv, msg in ((["--tasks", "no_such_task_xyz", "--include-path", str(tasks)], "unknown ['no_such_task_xyz']"),
                      (["--tasks", TASK, "--text", "t.txt"], "exactly one of --text"),
                      (["--tasks", TASK, "--include-path", str(tasks / "nowhere")], "is not a directory")):
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(ck), *argv, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and msg in err[0]
