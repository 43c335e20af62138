"""Fuzzing user input: every run of the CLI on mutated input ends in success (exit 0) or in exactly one line
`layerskip: error: ...` with exit status 2, never another exception (issue 17).

The mutators are plain functions of a `random.Random` and a valid input, so other front ends' tests (a later
HTTP server) can reuse them; every case is seeded by its name, so a failure reproduces from its test id.
"""

from __future__ import annotations

import dataclasses
import json
import random
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

import layerskip
from conftest import gguf_metadata, make_hf_model, write_tiny_gguf
from layerskip.cli import main
from layerskip.errors import LayerSkipError

ERROR_PREFIX = "layerskip: error: "

# ---- mutators (reusable) ------------------------------------------------------------------------------------

# Option values users mistype, and values at the edges of what parsers accept.
HOSTILE_VALUES = ("-1", "0", "-0", "99999999", "999999999999999999999999", "1e309", "nan", "inf", "-inf", "3.5",
                  "abc", "", " ", "1,,2", ",", "-5,7", "0x10", "１２", "\x00", "true", "1:2:0", "5:1", "1:100000:1")


def mutate_option_value(rng: random.Random, value: str) -> str:
    """A mistyped or edge-case version of one option value."""
    kind = rng.randrange(4)
    if kind == 0 or not value:
        return rng.choice(HOSTILE_VALUES)
    if kind == 1:  # a number nudged past its range, or negated
        try:
            number = float(value)
        except ValueError:
            return value + rng.choice(("x", ",", "\\", "{", "\u00e9"))
        result = rng.choice((-number, number * 1000003, number - 1, number + 0.5))
        return str(int(result)) if result == int(result) and "." not in value else repr(result)
    if kind == 2:  # one character changed
        index = rng.randrange(len(value))
        return value[:index] + rng.choice("-0,.:x9 ") + value[index + 1:]
    return value * rng.randint(2, 3)  # repeated: "22", "1,21,2"


def mutate_options(rng: random.Random, options: dict[str, str], mutable: Sequence[str], *,
                   count: int = 1) -> dict[str, str]:
    """`options` (flag -> value) with `count` of the `mutable` flags given hostile values."""
    mutated = dict(options)
    for flag in rng.sample(list(mutable), min(count, len(mutable))):
        mutated[flag] = mutate_option_value(rng, options.get(flag, ""))
    return mutated


def options_argv(options: dict[str, str]) -> list[str]:
    return [part for flag, value in options.items() for part in (flag, value)]


def overrides_argv(overrides: dict[str, str]) -> list[str]:
    """`layerskip train`'s key=value overrides."""
    return [f"{key}={value}" for key, value in overrides.items()]


REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SIZE_CONFIG_KEYS = REQUIRED_CONFIG_KEYS + ("num_key_value_heads", "head_dim", "max_position_embeddings")
WRONG_TYPES: tuple[Any, ...] = ("64", "sixty-four", [64], {"value": 64}, True, 64.5, None, -1, 0, 1e30)


def mutate_config(rng: random.Random, config: dict[str, Any]) -> dict[str, Any]:
    """A corrupted HF config.json dict: a deleted key, a wrong type, a zero or negative size, inconsistent
    heads, or broken rope settings."""
    mutated = dict(config)
    kind = rng.randrange(6)
    if kind == 0:
        del mutated[rng.choice([key for key in REQUIRED_CONFIG_KEYS if key in mutated])]
    elif kind == 1:
        mutated[rng.choice(sorted(mutated))] = rng.choice(WRONG_TYPES)
    elif kind == 2:
        mutated[rng.choice(SIZE_CONFIG_KEYS)] = rng.choice((0, -1, -64))
    elif kind == 3:  # heads that do not divide the hidden size, or key/value heads that do not divide the heads
        key = rng.choice(("num_attention_heads", "num_key_value_heads"))
        mutated[key] = rng.choice((3, 5, 7, 128))
    elif kind == 4:  # an explicit head_dim that the weights do not have
        mutated["head_dim"] = rng.choice((2, 8, 10, 32, 33))
    else:
        mutated["rope_scaling"] = rng.choice(({"rope_type": "linear"}, {"rope_type": "llama3", "factor": 8.0},
                                              {"rope_type": "yarn", "factor": 2.0}, "linear", [1, 2],
                                              {"rope_type": "linear", "factor": "two"}))
    return mutated


def truncate_bytes(rng: random.Random, data: bytes) -> bytes:
    """The file cut short: within its header, or anywhere."""
    cut = rng.choice((rng.randrange(0, min(64, len(data))), rng.randrange(0, len(data))))
    return data[:cut]


def flip_bits(rng: random.Random, data: bytes, *, flips: int = 8, header: int | None = None) -> bytes:
    """`flips` random bits flipped, within the first `header` bytes when given (where the structure is)."""
    buffer = bytearray(data)
    span = min(len(buffer), header or len(buffer))
    for _ in range(flips):
        buffer[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def mutate_jsonl(rng: random.Random, records: Sequence[dict[str, Any]]) -> str:
    """A malformed JSON Lines file made from valid `records`: a broken line, a non-object, a missing field,
    a field of the wrong type, a byte-order mark, binary garbage, or nothing at all."""
    lines = [json.dumps(record) for record in records]
    kind = rng.randrange(8)
    index = rng.randrange(len(lines))
    if kind == 0:
        lines[index] = lines[index][: rng.randrange(1, len(lines[index]))]
    elif kind == 1:
        lines[index] = rng.choice(("[1, 2]", "\"text\"", "42", "null", "true"))
    elif kind in (2, 3):
        record = dict(records[index])
        key = rng.choice(sorted(record))
        if kind == 2:
            del record[key]
        else:
            record[key] = rng.choice((None, 42, 1.5, ["a", "b"], {"x": 1}, True, "", [-1, 99999999]))
        lines[index] = json.dumps(record)
    elif kind == 4:
        lines[0] = "\ufeff" + lines[0]
    elif kind == 5:
        lines.insert(index, "\x00\xff\xfe garbage {")
    elif kind == 6:
        return ""
    else:
        lines = ["{}" for _ in lines]
    return "\n".join(lines) + "\n"


# ---- running the CLI ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    exception: str | None = None  # the traceback of an exception that escaped main()


def run_main(capsys: Any, argv: Sequence[str]) -> Outcome:
    """`layerskip ARGV` in this process, with its exit status and captured output."""
    try:
        code, exception = main(list(argv)), None
    except SystemExit as exit_:  # argparse's --help, or a sys.exit deep down
        code, exception = exit_.code if isinstance(exit_.code, int) else 1, None
    except BaseException:  # noqa: BLE001 - that is what the fuzz test looks for
        code, exception = None, traceback.format_exc()
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err, exception)


def assert_clean(outcome: Outcome, argv: Sequence[str], *, allowed: tuple[int, ...] = (0,)) -> None:
    """Success, or exactly one `layerskip: error:` line, the last on stderr, with status 2; no traceback."""
    shown = " ".join(repr(part) if not part or " " in part else part for part in argv)
    assert outcome.exception is None, f"`layerskip {shown}` raised:\n{outcome.exception}"
    assert "Traceback" not in outcome.err, f"`layerskip {shown}` printed a traceback:\n{outcome.err}"
    if outcome.code in allowed:
        return
    # Progress bars redraw with carriage returns: the error must come after them, on a line of its own.
    lines = [line for line in outcome.err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_PREFIX in line]
    assert outcome.code == 2, f"`layerskip {shown}` exited {outcome.code}:\n{outcome.err[-2000:]}"
    assert len(errors) == 1 and errors[0].startswith(ERROR_PREFIX) and lines[-1] == errors[0], \
        f"`layerskip {shown}` did not end in exactly one error line:\n{outcome.err[-2000:]}"
    assert len(errors[0]) > len(ERROR_PREFIX) + 5, f"`layerskip {shown}`: an empty error message"


def assert_library_clean(call: Callable[[], Any], what: str) -> None:
    """A library call succeeds or raises LayerSkipError, nothing else."""
    try:
        call()
    except LayerSkipError:
        pass
    except Exception:  # noqa: BLE001
        pytest.fail(f"{what} raised:\n{traceback.format_exc()}")


# Python values for the library API's keyword options (what an HTTP server would pass on from JSON).
HOSTILE_OBJECTS: tuple[Any, ...] = (-1, 0, 99999999, 2 ** 70, float("nan"), float("inf"), -0.5, 1.5, [], [-1],
                                    [99999999], [1, 2], [True])


def mutate_library_options(rng: random.Random, options: dict[str, Any]) -> dict[str, Any]:
    """Keyword options of `layerskip.generate` with one given a hostile value of a plausible type."""
    mutated = dict(options)
    name = rng.choice(sorted(mutated))
    pool = [value for value in HOSTILE_OBJECTS if isinstance(value, list) == isinstance(options[name], list)]
    mutated[name] = rng.choice(pool)
    return mutated


# ---- tiny inputs made here ----------------------------------------------------------------------------------

WORDS = ("the a an and or of to in on is was it this that with for as at by from hello world model layer skip "
         "fast slow token text prompt answer question code data test exit early draft verify accept reject "
         "one two three four five six seven eight nine ten red green blue cat dog tree sun moon star rain "
         "wind fire water earth stone river hill road city house door room book page line word letter name "
         "time day night year good bad new old big small long short high low first last next").split()


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly `vocab_size` tokens: <unk>, <s>, </s>, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)][:vocab_size]
    words += [f"w{index}" for index in range(vocab_size - len(words))]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def mutate_gguf_metadata(rng: random.Random, metadata: dict[str, Any]) -> dict[str, Any]:
    """GGUF metadata with a key dropped, a value zeroed, negated or of the wrong type, or heads inconsistent."""
    mutated = dict(metadata)
    key = rng.choice(sorted(mutated))
    kind = rng.randrange(4)
    if kind == 0:
        del mutated[key]
    elif kind == 1:
        mutated[key] = rng.choice((0, -3, 0.0))
    elif kind == 2:
        mutated[key] = rng.choice(("sixty-four", "", "4"))
    else:
        mutated[rng.choice(("llama.attention.head_count", "llama.attention.head_count_kv"))] = rng.choice((3, 5, 64))
    return mutated


@dataclasses.dataclass
class Inputs:
    root: Path
    model: Path       # a tiny checkpoint with a word-level tokenizer
    bare: Path        # the same weights without tokenizer
    gguf: Path
    dataset: Path     # custom_jsonl: prompt/response records
    text: Path        # plain text for exits and train
    records: list[dict[str, Any]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("fuzz")
    hf = make_hf_model(num_hidden_layers=3, max_position_embeddings=128)
    bare = root / "bare"
    hf.save_pretrained(bare)
    model = root / "model"
    hf.save_pretrained(model)
    write_word_tokenizer(model, hf.config.vocab_size)
    gguf_path = root / "tiny.gguf"
    write_tiny_gguf(gguf_path, hf)
    records = [{"prompt": f"the {word} is", "response": f" a {word}"} for word in ("cat", "dog", "tree")]
    dataset = root / "data.jsonl"
    dataset.write_text("".join(json.dumps(record) + "\n" for record in records))
    text = root / "text.txt"
    text.write_text(" ".join(random.Random(0).choice(WORDS) for _ in range(400)))
    return Inputs(root, model, bare, gguf_path, dataset, text, records)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread: tiny models gain nothing from more, and on a busy machine threads wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def quick_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torch's own kernels (no native build or timing at load), and a cache of this test's own."""
    monkeypatch.setenv("LAYERSKIP_CPU_KERNELS", "plain")
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---- CLI option values --------------------------------------------------------------------------------------

def command_options(command: str, inputs: Inputs, output: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """(the command words, valid options, the options to mutate) for one command on the tiny inputs."""
    generation = {"--max_steps": "2", "--sample": "false", "--seed": "3", "--temperature": "0.7", "--top_p": "0.9",
                  "--top_k": "5", "--stop_token_ids": "2", "--draft_vocab_size": "0"}
    dataset = {"--dataset": "custom_jsonl", "--data_path": str(inputs.dataset), "--num_samples": "1",
               "--output_dir": str(output)}
    mutable_generation = ["--max_steps", "--seed", "--temperature", "--top_p", "--top_k", "--stop_token_ids",
                          "--draft_vocab_size"]
    if command == "generate":
        options = {"--model": str(inputs.model), "--prompt": "hello world", "--generation_strategy": "self_speculative",
                   "--exit_layer": "1", "--num_speculations": "2", "--draft_confidence": "0.1", **generation,
                   "--sample": "true"}
        return ["generate"], options, ["--prompt_ids", "--exit_layer", "--num_speculations", "--draft_confidence",
                                       "--sample", "--dtype", "--quantize", "--prompt", *mutable_generation]
    if command in ("benchmark", "correctness"):
        options = {"--model": str(inputs.model), "--exit_layer": "1", "--num_speculations": "2", **generation,
                   **dataset}
        if command == "benchmark":
            options["--generation_strategy"] = "self_speculative"
        return [command], options, ["--num_samples", "--exit_layer", "--num_speculations", "--n_shot",
                                    "--template", "--prompt_field", *mutable_generation]
    if command == "sweep":
        options = {"--model": str(inputs.model), "--exit_layers": "1,2", "--num_speculations": "2",
                   "--draft_confidence": "0", **generation, **dataset}
        return ["sweep"], options, ["--exit_layers", "--num_speculations", "--draft_confidence", "--num_samples",
                                    "--max_steps", "--min_speedup", "--stop_token_ids"]
    if command == "exits":
        options = {"--model": str(inputs.model), "--data_path": str(inputs.text), "--seq_len": "16",
                   "--num_samples": "1", "--gen_tokens": "2", "--num_speculations": "2", "--output_dir": str(output)}
        return ["exits"], options, ["--seq_len", "--num_samples", "--gen_tokens", "--text_field", "--seed"]
    assert command == "train"
    overrides = {"model": str(inputs.model), "output_dir": str(output), "data.sources": str(inputs.text),
                 "steps": "1", "data.seq_len": "8", "data.batch_size": "2", "log_every": "1", "save_every": "1",
                 "optim.warmup_steps": "0", "precision": "fp32", "early_exit.rotation": "2"}
    return ["train"], overrides, ["steps", "data.seq_len", "data.batch_size", "optim.lr", "early_exit.rotation",
                                  "layer_dropout.p_max", "data.sources", "draft_vocab"]


COMMANDS = ("generate", "benchmark", "correctness", "sweep", "exits", "train")


@pytest.mark.parametrize("command", COMMANDS)
def test_unmutated_options_succeed(inputs, tmp_path, capsys, command):
    """The inputs that the option cases mutate are valid: a mutation, not the base, makes a run fail."""
    words, options, _ = command_options(command, inputs, tmp_path / "out")
    argv = words + (overrides_argv(options) if command == "train" else options_argv(options))
    outcome = run_main(capsys, argv)
    assert_clean(outcome, argv, allowed=(0,))
    assert outcome.code == 0, outcome.err[-2000:]


OPTION_CASES = [(command, index) for command, count in (("generate", 8), ("benchmark", 5), ("correctness", 4),
                                                          ("sweep", 4), ("exits", 5), ("train", 4))
                for index in range(count)]


@pytest.mark.parametrize("command, index", OPTION_CASES, ids=[f"{c}-{i}" for c, i in OPTION_CASES])
def test_mutated_option_values(inputs, tmp_path, capsys, command, index):
    rng = random.Random(f"options-{command}-{index}")
    words, options, mutable = command_options(command, inputs, tmp_path / "out")
    mutated = mutate_options(rng, options, mutable, count=1 + (index % 3 == 2))
    argv = words + (overrides_argv(mutated) if command == "train" else options_argv(mutated))
    # correctness exits 1 when a sample differs: an outcome, not an error
    assert_clean(run_main(capsys, argv), argv, allowed=(0, 1) if command == "correctness" else (0,))


# Values at the edges that a random draw may miss: kept as fixed cases.
EDGE_CASES = [("--seed", "999999999999999999999999"), ("--temperature", "nan"),
              ("--max_steps", "99999999"), ("--num_speculations", "99999999"), ("--top_k", "99999999"),
              ("--exit_layer", "-1"), ("--prompt", "\x00\ufffd"), ("--draft_confidence", "nan")]


@pytest.mark.parametrize("flag, value", EDGE_CASES, ids=[f"{f}={v!r}" for f, v in EDGE_CASES])
def test_edge_option_values(inputs, tmp_path, capsys, flag, value):
    _, options, _ = command_options("generate", inputs, tmp_path / "out")
    argv = ["generate", *options_argv({**options, flag: value})]
    assert_clean(run_main(capsys, argv), argv)


def test_out_of_vocabulary_token_ids_are_refused_everywhere(inputs, capsys):
    """--stop_token_ids and --prompt_ids outside [0, vocab_size): one check shared by the commands and the API."""
    loaded = layerskip.load(str(inputs.bare))
    for bad in ("99999999", "-1", "97"):
        for flag in ("--stop_token_ids", "--prompt_ids"):
            argv = ["generate", "--model", str(inputs.bare), "--prompt_ids", "1,2", "--max_steps", "1", flag, bad]
            outcome = run_main(capsys, argv)
            assert_clean(outcome, argv, allowed=())
            assert f"{bad} is outside the vocabulary [0, 97)" in outcome.err
        with pytest.raises(LayerSkipError, match=f"--stop_token_ids {bad} is outside the vocabulary"):
            layerskip.generate(loaded, prompt_ids=[1, 2], max_steps=1, stop_token_ids=[int(bad)])
    argv = ["benchmark", "--model", str(inputs.model), "--dataset", "custom_jsonl", "--data_path",
            str(inputs.dataset), "--num_samples", "1", "--max_steps", "1", "--stop_token_ids", "99999999"]
    outcome = run_main(capsys, argv)
    assert_clean(outcome, argv, allowed=())
    assert "--stop_token_ids 99999999 is outside the vocabulary" in outcome.err


def test_mutated_library_options(inputs):
    """`layerskip.generate`'s keyword options: a result or a LayerSkipError, whatever their values."""
    loaded = layerskip.load(str(inputs.bare))
    valid = {"generation_strategy": "self_speculative", "exit_layer": 1, "num_speculations": 2, "max_steps": 2,
             "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "stop_token_ids": [2], "draft_confidence": 0.1}
    for index in range(12):
        options = mutate_library_options(random.Random(f"library-{index}"), valid)
        prompt = [1, 2] if index % 3 else options.pop("stop_token_ids")
        assert_library_clean(lambda: layerskip.generate(loaded, prompt_ids=prompt, **options),
                             f"layerskip.generate(prompt_ids={prompt}, **{options})")


# ---- corrupted checkpoints ----------------------------------------------------------------------------------

def copy_checkpoint(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def generate_argv(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt_ids", "1,2,3", "--max_steps", "2", *extra]


@pytest.mark.parametrize("index", range(10))
def test_corrupted_config_json(inputs, tmp_path, capsys, index):
    rng = random.Random(f"config-{index}")
    folder = copy_checkpoint(inputs.bare, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(mutate_config(rng, config)))
    argv = generate_argv(folder)
    outcome = run_main(capsys, argv)
    assert_clean(outcome, argv)
    if outcome.code == 2:
        assert str(folder) in outcome.err  # the message names the file (config.json) or the weights


def test_config_json_lacking_required_keys_names_file_and_key(inputs, tmp_path, capsys):
    folder = copy_checkpoint(inputs.bare, tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    outcome = run_main(capsys, generate_argv(folder))
    assert outcome.code == 2 and outcome.err == (
        f"{ERROR_PREFIX}{folder / 'config.json'}: required keys 'vocab_size', 'intermediate_size', "
        "'num_hidden_layers', 'num_attention_heads' are missing\n")


@pytest.mark.parametrize("index", range(4))
def test_truncated_or_bit_flipped_safetensors(inputs, tmp_path, capsys, index):
    rng = random.Random(f"safetensors-{index}")
    folder = copy_checkpoint(inputs.bare, tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(truncate_bytes(rng, data) if index % 2 else flip_bits(rng, data, flips=4, header=header))
    argv = generate_argv(folder)
    assert_clean(run_main(capsys, argv), argv)


@pytest.mark.parametrize("index", range(4))
def test_truncated_or_bit_flipped_gguf(inputs, tmp_path, capsys, index):
    rng = random.Random(f"gguf-{index}")
    path = tmp_path / "tiny.gguf"
    data = inputs.gguf.read_bytes()
    path.write_bytes(truncate_bytes(rng, data) if index % 2 else flip_bits(rng, data, flips=1 + index % 3, header=2048))
    argv = generate_argv(path)
    assert_clean(run_main(capsys, argv), argv)


@pytest.mark.parametrize("index", range(6))
def test_mutated_gguf_metadata(tmp_path, capsys, index):
    rng = random.Random(f"gguf-metadata-{index}")
    hf = make_hf_model(num_hidden_layers=2, max_position_embeddings=64)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf, mutate_gguf_metadata(rng, gguf_metadata(hf)))
    argv = generate_argv(path)
    assert_clean(run_main(capsys, argv), argv)


@pytest.mark.parametrize("damage", ["garbage", "empty", "missing_model_file"])
def test_unreadable_tokenizer(inputs, tmp_path, capsys, damage):
    """A broken tokenizer is an error for a text prompt; token-id prompts still decode."""
    folder = copy_checkpoint(inputs.model, tmp_path / "model")
    if damage == "missing_model_file":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "tokenizer.json").write_text("{not json" if damage == "garbage" else "")
    argv = ["generate", "--model", str(folder), "--prompt", "hello world", "--max_steps", "2"]
    outcome = run_main(capsys, argv)
    assert_clean(outcome, argv)
    assert outcome.code == 2 and "tokenizer" in outcome.err
    argv = generate_argv(folder)
    assert_clean(run_main(capsys, argv), argv, allowed=(0,))
    assert run_main(capsys, argv).code == 0


# ---- malformed JSONL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(8))
def test_malformed_jsonl_dataset(inputs, tmp_path, capsys, index):
    rng = random.Random(f"jsonl-{index}")
    data = tmp_path / "data.jsonl"
    data.write_text(mutate_jsonl(rng, inputs.records), encoding="utf-8", errors="surrogateescape")
    command = ("benchmark", "correctness")[index % 2]
    argv = [command, "--model", str(inputs.model), "--dataset", "custom_jsonl", "--data_path", str(data),
            "--max_steps", "2", "--sample", "false", "--exit_layer", "1", "--num_speculations", "2",
            "--output_dir", str(tmp_path / "out")]
    assert_clean(run_main(capsys, argv), argv, allowed=(0, 1) if command == "correctness" else (0,))


@pytest.mark.parametrize("index", range(4))
def test_malformed_jsonl_text_set(inputs, tmp_path, capsys, index):
    rng = random.Random(f"jsonl-text-{index}")
    data = tmp_path / "text.jsonl"
    records = [{"text": " ".join(random.Random(n).choice(WORDS) for _ in range(40))} for n in range(3)]
    data.write_text(mutate_jsonl(rng, records), encoding="utf-8", errors="surrogateescape")
    command = ("exits", "train")[index % 2]
    if command == "exits":
        argv = ["exits", "--model", str(inputs.model), "--data_path", str(data), "--seq_len", "8",
                "--num_samples", "1", "--gen_tokens", "1", "--output_dir", str(tmp_path / "out")]
    else:
        argv = ["train", f"model={inputs.model}", f"output_dir={tmp_path / 'out'}", f"data.sources={data}", "steps=1",
                "data.seq_len=8", "data.batch_size=1", "save_every=1", "precision=fp32", "optim.warmup_steps=0"]
    assert_clean(run_main(capsys, argv), argv)
