"""`layerskip generate`: JSON output, token-id prompts, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import layerskip
from conftest import assert_same_greedy_tokens
from layerskip.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_on_a_checkpoint_without_tokenizer(tiny_checkpoint, capsys):
    folder, hf = tiny_checkpoint()
    code, out, _ = run_cli(capsys, "--model", str(folder), "--prompt_ids", "1,17,42", "--max_steps", "6",
                           "--sample", "false", "--output", "json", "--generation_strategy", "self_speculative",
                           "--exit_layer", "2", "--num_speculations", "3", "--ignore_eos")
    assert code == 0
    report = json.loads(out)
    expected = hf.generate(torch.tensor([[1, 17, 42]]), max_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
    assert_same_greedy_tokens(layerskip.load(str(folder)), [1, 17, 42], expected, report["token_ids"],
                              row_invariant=False)  # HF runs MKL
    assert report["text"] is None and report["finish_reason"] == "max_steps"
    stats = report["stats"]
    for key in ("new_tokens", "seconds", "tokens_per_second", "time_per_token", "acceptance_rate",
                "accepted_length_counts", "draft_forwards", "verify_forwards"):
        assert key in stats
    assert stats["new_tokens"] == 6 and 0 <= stats["acceptance_rate"] <= 1
    assert report["settings"] == {"generation_strategy": "self_speculative", "exit_layer": 2, "num_speculations": 3,
                                  "weight_format": "float32", "cpu_kernels": layerskip.load(str(folder)).model.kernel_path,
                                  "device": "cpu"}


def test_default_model_chat_prompt_streams_text_and_prints_stats(capsys):
    code, out, err = run_cli(capsys, "--prompt", "Say hello.", "--sample", "false", "--max_steps", "12",
                             "--generation_strategy", "self_speculative", "--exit_layer", "26", "--num_speculations", "3")
    assert code == 0
    assert out.strip() and "acceptance" in err and "tokens/s" in err


BAD_INPUTS = [
    (["--model", "/no/such/model"], "unknown model '/no/such/model'"),
    (["--exit_layer", "30", "--generation_strategy", "self_speculative"], "outside [1, 29]"),
    (["--exit_layer", "0", "--generation_strategy", "self_speculative"], "outside [1, 29]"),
    (["--exit_layer", "31", "--generation_strategy", "autoregressive"], "outside [1, 30]"),
    (["--draft_vocab_size", "100000", "--generation_strategy", "self_speculative"], "--draft_vocab_size 100000 is outside"),
    (["--num_speculations", "0", "--generation_strategy", "self_speculative", "--exit_layer", "4"],
     "--num_speculations must be at least 1"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt_ids", ""], "the prompt is empty"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--quantize", "int3"], "unknown quantize 'int3': choose one of none, bf16, int8, int4"),
    (["--generation_strategy", "beam"], "unknown --generation_strategy 'beam'"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--sample", "maybe"], "expected true or false"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    if "--prompt" not in args and "--prompt_ids" not in args:
        args = [*args, "--prompt", "hello"]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("layerskip: error: ") and message in err


def test_cuda_asked_for_but_absent(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    code, _, err = run_cli(capsys, "--device", "cuda", "--prompt", "hi")
    assert code == 2 and "CUDA is not available" in err


def test_prompt_longer_than_the_context(tiny_checkpoint, capsys):
    folder, _ = tiny_checkpoint(max_position_embeddings=16)
    code, _, err = run_cli(capsys, "--model", str(folder), "--prompt_ids", ",".join(["5"] * 20))
    assert code == 2 and "the prompt is 20 tokens, but the model's context is 16" in err


def test_stop_words_without_tokenizer(tiny_checkpoint, capsys):
    folder, _ = tiny_checkpoint()
    code, _, err = run_cli(capsys, "--model", str(folder), "--prompt_ids", "1,2", "--stop_words", "x")
    assert code == 2 and "--stop_words needs a tokenizer" in err


def test_console_script_error_has_no_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    process = subprocess.run([sys.executable, "-m", "layerskip.cli", "generate", "--model",
                              str(tmp_path / "notes.txt"), "--prompt", "hi"], capture_output=True, text=True)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines() == [
        f"layerskip: error: {tmp_path / 'notes.txt'} is not a model checkpoint: give a checkpoint folder, "
        "a .gguf file or a hub id"]


@pytest.mark.parametrize("flag, value", [("--stop_token_ids", "99999999"), ("--stop_token_ids", "-1"),
                                         ("--stop_token_ids", "5,97"), ("--prompt_ids", "1,-1")])
def test_token_ids_outside_the_vocabulary(tiny_checkpoint, capsys, flag, value):
    folder, _ = tiny_checkpoint()
    capsys.readouterr()  # the checkpoint writer's progress bar
    args = ["--model", str(folder), "--max_steps", "1", *(["--prompt_ids", "1,2"] if flag != "--prompt_ids" else []),
            flag, value]
    code, _, err = run_cli(capsys, *args)
    bad = value.split(",")[-1]
    assert code == 2 and err.count("\n") == 1 and err.startswith("layerskip: error: ")
    assert f"{bad} is outside the vocabulary [0, 97)" in err


def test_library_api_checks_stop_token_ids(tiny_checkpoint):
    from layerskip.errors import LayerSkipError

    folder, _ = tiny_checkpoint()
    loaded = layerskip.load(str(folder))
    with pytest.raises(LayerSkipError, match=r"--stop_token_ids 99999999 is outside the vocabulary \[0, 97\)"):
        layerskip.generate(loaded, prompt_ids=[1, 2], max_steps=1, stop_token_ids=[99999999])
    assert layerskip.generate(loaded, prompt_ids=[1, 2], max_steps=1, stop_token_ids=[96]).token_ids


@pytest.mark.parametrize("flag, value, message", [("--temperature", "nan", "--temperature must be a finite number"),
                                                  ("--seed", str(2 ** 64), "--seed 18446744073709551616 is out of range")])
def test_sampling_settings_out_of_range(tiny_checkpoint, capsys, flag, value, message):
    folder, _ = tiny_checkpoint()
    capsys.readouterr()
    code, _, err = run_cli(capsys, "--model", str(folder), "--prompt_ids", "1,2", "--max_steps", "1", flag, value)
    assert code == 2 and err.startswith("layerskip: error: ") and message in err


def test_prompts_file_decodes_a_batch_and_writes_one_object_per_prompt(default_model, tmp_path, capsys):
    prompts = ["Name a colour.", [{"role": "user", "content": "Say hi."}], "What is 2+2?"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages" if isinstance(p, list) else "prompt": p}) + "\n" for p in prompts))
    assert main(["generate", "--prompts_file", str(path), "--batch_size", "2", "--output", "jsonl", "--sample", "false",
                 "--max_steps", "12"]) == 0
    captured = capsys.readouterr()
    records = sorted((json.loads(line) for line in captured.out.splitlines()), key=lambda record: record["index"])
    assert [record["index"] for record in records] == [0, 1, 2] and "tokens/s in all" in captured.err
    for prompt, record in zip(prompts, records):
        alone = layerskip.generate(default_model, prompt, sample=False, max_steps=12)
        assert_same_greedy_tokens(default_model, layerskip.encode_prompt(default_model, prompt), alone.token_ids,
                                  record["token_ids"])
        assert record["stats"]["new_tokens"] == len(record["token_ids"])
    path.write_text('{"text": "no prompt here"}\n')
    assert main(["generate", "--prompts_file", str(path)]) == 2
    assert "has no 'prompt' string or 'messages' list" in capsys.readouterr().err
