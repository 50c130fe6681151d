"""grass_llm.evaluate: LLM-Adapters answer rules, benchmark registry, evaluation files and the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grass_llm import evaluate as E
from grass_llm.data import builtin_tokenizer

B = E.BENCHMARKS


# ------------------------------------------------------------------------------------------------
# extraction rules, on hand-made responses
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is 576.", 576.0),
        ("1,234 + 1 = 1,235", 1235.0),  # commas removed first
        ("It drops to -7 degrees", -7.0),
        ("3.5 hours", 3.5),
        ("first 3, then 4, so 12", 12.0),  # the last number wins
        ("no number here", None),
        ("", None),
        ("x = 5. y = 2.25", 2.25),
        ("-0.5", -0.5),
    ],
)
def test_extract_number(response, expected):
    assert E.extract_number(response) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The option is (C).", "C"),  # "The" has no capital A-E; first capital A-E is C
        ("B or D", "B"),
        ("Answer: D", "A"),  # upstream quirk: the A of "Answer" counts
        ("none of these", None),
        ("E", "E"),
        ("(f) is not allowed, but b neither", None),
    ],
)
def test_extract_letter(response, expected):
    assert E.extract_letter(response) == expected


@pytest.mark.parametrize(
    ("bench", "response", "expected"),
    [
        ("BoolQ", "the correct answer is false", "false"),
        ("BoolQ", "true or false? false", "true"),  # the first match
        ("BoolQ", "True", None),  # case-sensitive, as upstream
        ("PIQA", "the correct answer is solution2", "solution2"),
        ("SIQA", "answer3 and answer1", "answer3"),
        ("ARC-e", "the correct answer is answer5", "answer5"),
        ("ARC-c", "the correct answer is answer4", "answer4"),
        ("OBQA", "I don't know", None),
        ("HellaSwag", "ending4 fits best", "ending4"),
        ("HellaSwag", "answer1", None),
        ("WinoGrande", "the correct answer is option1", "option1"),
    ],
)
def test_commonsense_rules(bench, response, expected):
    assert E.predict(B[bench], response) == expected


def test_extract_response_and_correctness():
    text = "Below ...\n### Instruction:\nQ\n### Response:\n   The answer is 4  "
    assert E.extract_response(text) == "The answer is 4"
    assert E.extract_response("a ### Response: b ### Response: c") == "b"  # split(...)[1], as upstream
    assert E.is_correct(B["GSM8K"], 576.0005, "576.0")
    assert not E.is_correct(B["GSM8K"], 576.01, "576.0")
    assert E.is_correct(B["AddSub"], -3.0, "-3")
    assert not E.is_correct(B["GSM8K"], None, "1")
    assert E.is_correct(B["AQuA"], "C", "C") and not E.is_correct(B["AQuA"], "C", "D")
    assert E.is_correct(B["BoolQ"], "true", "true") and not E.is_correct(B["BoolQ"], None, "true")


# ------------------------------------------------------------------------------------------------
# registry and files
def test_registry_matches_paper_and_llm_adapters_layout():
    assert list(E.GROUPS["arithmetic"]) == ["MultiArith", "AddSub", "GSM8K", "AQuA", "SingleEq", "SVAMP"]
    assert [B[n].column for n in E.GROUPS["commonsense"]] == [
        *("BoolQ", "PIQA", "SIQA", "HellaS.", "WinoG.", "ARC-e", "ARC-c", "OBQA"),
    ]
    assert len(B) == 14
    assert {n: b.folder for n, b in B.items() if b.group == "commonsense"} == {
        "BoolQ": "boolq",
        "PIQA": "piqa",
        "SIQA": "social_i_qa",
        "HellaSwag": "hellaswag",
        "WinoGrande": "winogrande",
        "ARC-e": "ARC-Easy",
        "ARC-c": "ARC-Challenge",
        "OBQA": "openbookqa",
    }
    assert B["MultiArith"].relpath == "dataset/MultiArith/test.json"


def test_resolve_benchmarks():
    benches, group = E.resolve_benchmarks("gsm8k, BoolQ,ARC-Easy,winog.")
    assert [b.name for b in benches] == ["GSM8K", "BoolQ", "WinoGrande", "ARC-e"] and not group
    benches, group = E.resolve_benchmarks(["arithmetic", "OBQA"])
    assert len(benches) == 7 and group
    assert len(E.resolve_benchmarks("all")[0]) == 14
    with pytest.raises(E.EvalInputError, match=r"unknown benchmark 'gsm9k'; allowed: groups arithmetic"):
        E.resolve_benchmarks("gsm9k")


def test_missing_file_names_path(tmp_path, shared_data):
    with pytest.raises(E.EvalInputError) as info:
        E.benchmark_path("HellaSwag", tmp_path)
    assert str(tmp_path / "dataset" / "hellaswag" / "test.json") in str(info.value)
    for name in E.GROUPS["all"]:
        if name != "HellaSwag":
            assert E.benchmark_path(name, shared_data).is_file()
    # both the shared root and the llm-adapters directory itself are accepted
    assert E.benchmark_path("GSM8K", shared_data / "llm-adapters") == E.benchmark_path("GSM8K", shared_data)


# ------------------------------------------------------------------------------------------------
# evaluate_model with a scripted model: known answers -> known accuracy
class ScriptedModel(torch.nn.Module):
    """Answers each prompt with a fixed reply chosen by its instruction; checks the call contract."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.tok, self.replies, self.calls = tokenizer, replies, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, generation_config):
        assert not generation_config.do_sample and generation_config.num_beams == 1
        assert bool(attention_mask[:, -1].all())  # left padding
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()])
            reply = next(v for k, v in self.replies.items() if k in prompt)
            new = self.tok(reply)["input_ids"][: generation_config.max_new_tokens]
            rows.append(ids.tolist() + new + [self.tok.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def _dataset(root: Path, folder: str, records: list[dict]) -> None:
    d = root / "llm-adapters" / "dataset" / folder
    d.mkdir(parents=True)
    (d / "test.json").write_text(json.dumps(records))


def test_evaluate_model_scripted(tmp_path):
    tok = builtin_tokenizer()
    math = [
        {"instruction": "Q1 apples?", "input": "", "output": "wrong 1", "answer": "1,000"},
        {"instruction": "Q2 pears?", "input": "", "output": "", "answer": "-2.5"},
        {"instruction": "Q3 plums?", "input": "", "output": "", "answer": "3"},
    ]
    boolq = [
        {"instruction": "B1 sky blue?", "input": "", "output": "", "answer": "true"},
        {"instruction": "B2 fish fly?", "input": "", "output": "", "answer": "false"},
    ]
    _dataset(tmp_path, "gsm8k", math)
    _dataset(tmp_path, "boolq", boolq)
    # AQuA's `output` is a stored rationale, not gold: only `answer` counts
    _dataset(
        tmp_path,
        "AQuA",
        [{"instruction": "A1 pick", "input": "", "output": "The answer is D", "answer": "B"}],
    )
    replies = {
        "Q1": "1 + 999 = 1,000. The answer is 1,000",
        "Q2": "It is -2.5",
        "Q3": "I cannot tell",
        "B1": "the correct answer is true",
        "B2": "the correct answer is true",
        "A1": "(B)",
    }
    model = ScriptedModel(tok, replies)
    out = tmp_path / "out"
    with pytest.raises(E.EvalInputError, match="hellaswag"):
        E.evaluate_model(model, tok, "GSM8K,HellaSwag", tmp_path, out, verbose=False)
    res = E.evaluate_model(
        model, tok, "arithmetic,commonsense", tmp_path, out, batch_size=2, model_name="M", method_name="GRASS",
        verbose=False,
    )  # fmt: skip
    assert model.calls == 4 and tok.padding_side == "right"  # 2 + 1 + 1 batches; padding side restored
    assert set(res["benchmarks"]) == {"GSM8K", "AQuA", "BoolQ"} and "HellaSwag" in res["skipped"]
    assert res["benchmarks"]["AQuA"]["correct"] == 1
    assert res["benchmarks"]["GSM8K"]["correct"] == 2 and res["benchmarks"]["BoolQ"]["correct"] == 1
    rows = [json.loads(line) for line in (out / "GSM8K.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prediction"] for r in rows] == [1000.0, -2.5, None] and [r["gold"] for r in rows] == [
        1000,
        -2.5,
        3,
    ]
    assert [r["correct"] for r in rows] == [True, True, False]
    assert rows[1]["response"] == "It is -2.5" and rows[1]["prompt"].endswith("### Response:\n" + " " * 16)
    md = (out / "results.md").read_text()
    assert "| M | GRASS | - | - | 66.67 | 100.00 | - | - | 83.33 |" in md
    assert "| M | GRASS | 50.00 | - | - | - | - | - | - | - | 50.00 |" in md
    assert "HellaSwag skipped" in md
    assert json.loads((out / "results.json").read_text()) == res


# ------------------------------------------------------------------------------------------------
# CLI, end to end with a tiny random Llama saved to disk
def _parse(argv):
    parser = argparse.ArgumentParser(prog="grass-llm eval")
    E.add_cli_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = builtin_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_end_to_end(tiny_model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_model_dir), "--benchmarks", "GSM8K,boolq", "--data-dir", str(shared_data)]
    argv += ["--out", str(out), "--limit", "4", "--batch-size", "4", "--max-new-tokens", "4"]
    argv += ["--dtype", "fp32", "--device", "cpu", "--method-name", "GRASS"]
    assert E.cli_main(_parse(argv)) == 0
    assert {p.name for p in out.iterdir()} == {"GSM8K.jsonl", "BoolQ.jsonl", "results.md", "results.json"}
    md = (out / "results.md").read_text()
    assert md in capsys.readouterr().out
    lines = md.splitlines()
    header2 = "| Model | Method | MultiArith | AddSub | GSM8K | AQuA | SingleEq | SVAMP | Avg. |"
    header3 = "| Model | Method | BoolQ | PIQA | SIQA | HellaS. | WinoG. | ARC-e | ARC-c | OBQA | Avg. |"
    assert header2 in lines and header3 in lines
    for name, header, col in (("GSM8K", header2, 4), ("BoolQ", header3, 2)):
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(
            set(r) == {"index", "prompt", "response", "prediction", "gold", "correct"} for r in rows
        )
        expected = f"{100 * sum(r['correct'] for r in rows) / len(rows):.2f}"
        row = lines[lines.index(header) + 2].split("|")
        assert row[1].strip() == "tiny-llama" and row[2].strip() == "GRASS"
        assert row[col + 1].strip() == expected and row[-2].strip() == expected  # Avg. of one benchmark
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["limit"] == 4 and res["benchmarks"]["GSM8K"]["total"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/nonexistent/model-dir"], "'/nonexistent/model-dir': model directory does not exist"),
        (
            ["--benchmarks", "GSM8K,squad"],
            "unknown benchmark 'squad'; allowed: groups arithmetic, commonsense, all",
        ),
        (["--benchmarks", "HellaSwag"], "hellaswag/test.json"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
    ],
)
def test_cli_bad_input_exit_2(argv, message, tiny_model_dir, shared_data, capsys):
    base = {"--model": str(tiny_model_dir), "--data-dir": str(shared_data), "--benchmarks": "GSM8K"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = _parse([x for kv in base.items() for x in kv])
    assert E.cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("grass-llm eval: error:") and message in err


@pytest.mark.parametrize("benchmarks", ["arithmetic", "GSM8K"])
def test_cli_without_data_says_so_once_before_loading_the_model(
    benchmarks, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """A group without --data-dir / $GRASS_DATA_DIR loaded the model, then printed the same sentence 6 times
    (and a group whose files are all missing loaded the model before refusing)."""
    monkeypatch.delenv("GRASS_DATA_DIR", raising=False)
    import importlib

    monkeypatch.setattr(importlib.import_module("grass_llm.evaluate.cli"), "_load", lambda a: pytest.fail("loaded"))
    assert E.cli_main(_parse(["--model", str(tiny_model_dir), "--benchmarks", benchmarks])) == 2
    err = capsys.readouterr().err
    assert err.startswith("grass-llm eval: error: no data directory: pass --data-dir") and err.count("\n") == 1
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(tmp_path), "--benchmarks", "arithmetic"]
    assert E.cli_main(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("grass-llm eval: error: no benchmark to evaluate: ") and err.count("\n") == 1


def test_cli_model_dir_without_config(tmp_path, capsys):
    assert E.cli_main(_parse(["--model", str(tmp_path)])) == 2
    assert "no config.json" in capsys.readouterr().err


def test_no_transformers_at_import():
    code = "import sys, grass_llm.evaluate, grass_llm.data; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_default_output_belongs_to_the_model_and_is_never_overwritten(
    tiny_model_dir, shared_data, tmp_path, capsys, monkeypatch
):
    """--model RUN/final writes to RUN/eval (not eval/final, the same for every run); a second eval stops
    with exit code 2 unless --overwrite."""
    import shutil

    monkeypatch.chdir(tmp_path)
    runs = []
    for name in ("run-a", "run-b"):
        run = tmp_path / "runs" / name
        shutil.copytree(tiny_model_dir, run / "final")
        (run / "log.jsonl").write_text("")
        runs.append(run)
    flags = ["--benchmarks", "GSM8K", "--data-dir", str(shared_data), "--limit", "2", "--max-new-tokens", "2"]
    flags += ["--dtype", "fp32", "--device", "cpu"]
    for run in runs:
        assert E.cli_main(_parse(["--model", str(run / "final"), *flags])) == 0
        assert (run / "eval" / "results.json").is_file() and (run / "eval" / "GSM8K.jsonl").is_file()
    assert not (tmp_path / "eval").exists()
    capsys.readouterr()
    before = (runs[0] / "eval" / "results.json").stat().st_mtime_ns
    assert E.cli_main(_parse(["--model", str(runs[0] / "final"), *flags])) == 2
    err = capsys.readouterr().err
    assert (
        f"grass-llm eval: error: {runs[0] / 'eval'} already holds results (GSM8K.jsonl, results.json, results.md); "
        "pass --overwrite to replace them, or --out DIR to write elsewhere"
    ) in err
    assert (runs[0] / "eval" / "results.json").stat().st_mtime_ns == before
    assert E.cli_main(_parse(["--model", str(runs[0] / "final"), *flags, "--overwrite"])) == 0
    (tmp_path / "file").write_text("x")
    assert (
        E.cli_main(_parse(["--model", str(runs[0] / "final"), *flags, "--out", str(tmp_path / "file")])) == 2
    )
    assert f"--out {str(tmp_path / 'file')!r} is a file; allowed: a directory" in capsys.readouterr().err
    # another local model: <dir>/eval; a hub name: eval/<org>--<name>
    assert E.default_out_dir(str(tiny_model_dir)) == tiny_model_dir / "eval"
    assert E.default_out_dir("TinyLlama/TinyLlama-1.1B") == Path("eval/TinyLlama--TinyLlama-1.1B")
