"""Fuzzed bad input: seeded mutations of configs, datasets, model directories and reward specs, each
run through `system.train.main` in this process, with training itself replaced by a stub (every
check runs before Ray starts, so no case needs a cluster; the whole set takes about a minute).

Each case must end in one of two ways: exit code 2 with one "config error: ..." line on stderr
(warnings, "config warning:" / "data warning:", may come first), or accepted (the stub is reached;
only documented warning lines on stderr). No exception may escape main and no traceback may be
printed. Broken model directories and reward specs must be refused before the stub (where the
actors would start). The test prints tried / clean / tracebacks.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.faults.test_rewards_and_data import debug_model_dir

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")
SEED = 22
GOOD_ROWS = [{"question": f"{a}+{b}-{c}=", "answer": str(a + b - c)}
             for a, b, c in [(1, 2, 3), (4, 5, 1), (9, 0, 2), (3, 3, 3), (7, 1, 5), (2, 8, 6)]]
WARNING_PREFIXES = ("config warning: ", "data warning: ")


class _Stub:
    """Stands in for system.train.train: the point where Ray and the actors would start."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs) -> int:
        self.calls += 1
        return 0


def _run_case(capsys, stub, argv) -> tuple[str, str]:
    """('clean' | 'traceback' | 'unclean', detail) for one run of main(argv)."""
    from system.train import main

    stub.calls = 0
    capsys.readouterr()  # what came before this case is not its output
    try:
        rc = main(argv)
    except BaseException as err:  # noqa: BLE001 - exactly what the test looks for
        capsys.readouterr()
        return "traceback", f"{type(err).__name__}: {err}"
    out = capsys.readouterr()
    text = out.out + out.err
    if "Traceback" in text:
        return "traceback", text[-500:]
    errors = [x for x in out.err.strip().splitlines() if x and not x.startswith(WARNING_PREFIXES)]
    if rc == 2 and len(errors) == 1 and errors[0].startswith("config error: ") and stub.calls == 0:
        return "clean", errors[0]
    if rc == 0 and not errors and stub.calls == 1:
        return "clean", "accepted"
    return "unclean", f"rc={rc} stub={stub.calls} stderr={out.err[-300:]!r}"


# ---- mutations --------------------------------------------------------------------------------

def _schema_keys() -> list[str]:
    import dataclasses

    from system.config import Config

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    # model.path and the debug model's settings would build a fresh debug model (minutes)
    return [k for k in walk(Config, "") if not k.startswith("model.") and k != "output_dir"]


BAD_VALUES = ["abc", "-1", "0", "1e30", "nan", "inf", "-inf", "''", "null", "true", "[1,2]",
              "{a: 1}", "[", "{", "x" * 300, "1.5", "-0.5", "99999999999999999999", "'\u00e9\u2603'"]

CROSS_FIELD = [
    ["trainer.prompts_per_step=3"],
    ["learner.minibatches=7"],
    ["algo.rollout_correction=tis"],
    ["rollout.top_p=0.5"],
    ["reference.source=adapters_off"],
    ["sync.lora=adapters", "learner.lora.rank=4", "rollout.backend=vllm", "rollout.kv_cache_gb=1"],
    ["rollout.backend=vllm", "rollout.kv_cache_gb=0"],
    ["rollout.backend=vllm", "rollout.enforce_eager=false"],
    ["algo.clip_low=0.9", "algo.clip_high=-0.5"],
    ["algo.pi_old=proximal", "algo.rollout_correction=mis", "algo.mis_bounds=[3, 1]"],
    ["data.source=synthetic"],
    ["data.source=file", "data.train_path=''"],
    ["learner.lora.rank=4", "learner.lora.target_modules=[]"],
    ["rollout.resources={CPU: 1}"],
    ["learner.resources={tag: -1}"],
    ["faults.nan_loss_at=[0]"],
    ["trainer.resume=/nonexistent/checkpoint"],
    ["run_name=../escape"],
    ["run_name=''"],
    ["output_dir=/proc/nope"],
    ["eval.size=0"],
    ["learner.num_ranks=3", "trainer.prompts_per_step=5"],
]


def config_cases(rng: random.Random, n: int) -> list[list[str]]:
    keys = _schema_keys()
    cases = [list(c) for c in CROSS_FIELD]
    while len(cases) < n:
        key = rng.choice(keys)
        kind = rng.random()
        if kind < 0.25:  # a misspelled key
            i = rng.randrange(len(key))
            cases.append([f"{key[:i]}{rng.choice('xqz_')}{key[i + 1:]}=1"])
        elif kind < 0.9:  # a bad or odd value
            cases.append([f"{key}={rng.choice(BAD_VALUES)}"])
        else:  # not key=value at all
            cases.append([rng.choice([key, f"{key}:1", f"={key}", "--" + key])])
    return cases


def yaml_cases(tmp: Path, rng: random.Random, n: int) -> list[str]:
    """Paths of damaged copies of configs/debug.yaml."""
    text = Path(DEBUG).read_text()
    paths = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            bad = text[:rng.randrange(len(text))] + "\n  steps: [1, 2\n"
        elif kind == 1:  # a tab in the indentation of a setting
            lines = text.splitlines()
            j = rng.choice([k for k, x in enumerate(lines) if x.startswith("  ") and not x.strip().startswith("#")])
            lines[j] = "\t" + lines[j].lstrip()
            bad = "\n".join(lines)
        elif kind == 2:
            bad = text + "\ntrainer: {steps: 5}\ntrainer: {steps: 6}\n"
        elif kind == 3:
            bad = "- just\n- a list\n"
        elif kind == 4:
            paths.append(_write(tmp / f"cfg{i}.yaml", b"\xff\xfe\x00garbage"))
            continue
        else:
            lines = text.splitlines()
            j = rng.choice([k for k, x in enumerate(lines) if x.strip() and not x.strip().startswith("#")])
            lines[j] = lines[j].split("#")[0] + ": ]"
            bad = "\n".join(lines)
        paths.append(_write(tmp / f"cfg{i}.yaml", bad.encode()))
    return paths


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def data_cases(tmp: Path, rng: random.Random, n: int) -> list[str]:
    """Paths of damaged or odd datasets (JSONL, JSON, Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = _jsonl(GOOD_ROWS)
    makers = [
        lambda: good[:rng.randrange(1, len(good))],  # truncated mid-line
        lambda: good + b'{"question": "1+1=", "ans',  # last line cut
        lambda: good.replace(b"+", b"\xff", 1),  # invalid UTF-8 in a line
        lambda: good.decode().encode("utf-16"),  # another encoding
        lambda: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in
                        [{"question": "3+4=\u00e9\u2603", "answer": "7"}]).encode(),  # unknown characters
        lambda: _jsonl([{"question": "What is 3+4?", "answer": "7"}] + GOOD_ROWS),
        lambda: _jsonl([{"question": rng.choice([1, 2.5, None, True, [], {}]), "answer": "1"}
                        for _ in range(4)]),  # non-string fields
        lambda: _jsonl([{"question": "1+1=", "answer": rng.choice([[], {}, None, True, ""])}
                        for _ in range(4)]),
        lambda: _jsonl([{"question": "1+" * 50_000 + "1=", "answer": "x"}] + GOOD_ROWS),  # a huge row
        lambda: _jsonl([{"question": "1+" * 50_000 + "1=", "answer": "x"}]),  # only a huge row
        lambda: b"",
        lambda: b"\n\n\n",
        lambda: b"[" * 100_000,  # nesting deeper than the parser's recursion
        lambda: b'[{"question": "1+1=", "answer": "2"}',  # a truncated JSON array
        lambda: good + b"[1, 2, 3]\n\"text\"\n",
        lambda: bytes(rng.randrange(256) for _ in range(200)),  # noise
    ]
    paths = []
    for i in range(n):
        k = i % (len(makers) + 4)
        if k < len(makers):
            suffix = ".json" if k in (12, 13) else ".jsonl"
            paths.append(_write(tmp / f"data{i}{suffix}", makers[k]()))
            continue
        path = tmp / f"data{i}.parquet"
        if k == len(makers):
            pq.write_table(pa.Table.from_pylist(GOOD_ROWS), path)
            path.write_bytes(path.read_bytes()[:rng.randrange(10, path.stat().st_size)])  # truncated
        elif k == len(makers) + 1:
            pq.write_table(pa.table({"question": [1, 2], "answer": [3, 4]}), path)  # ints
        elif k == len(makers) + 2:
            pq.write_table(pa.table({"other": ["a"]}), path)  # no such columns
        else:
            pq.write_table(pa.Table.from_pylist(GOOD_ROWS).slice(0, 0), path)  # no rows
        paths.append(str(path))
    return paths


def model_cases(tmp: Path, rng: random.Random, n: int) -> list[str]:
    """Paths of broken copies of the debug model directory; each must be refused."""
    base = Path(debug_model_dir())

    def cfg_edit(**change):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            c.update(change)
            (d / "config.json").write_text(json.dumps(c))
        return edit

    def truncate(name, keep):
        def edit(d):
            data = (d / name).read_bytes()
            (d / name).write_bytes(data[:keep(len(data))])
        return edit

    def drop_tensor(d):
        from safetensors.torch import load_file, save_file

        weights = load_file(d / "model.safetensors")
        weights.pop(rng.choice(sorted(weights)))
        save_file(weights, d / "model.safetensors", metadata={"format": "pt"})

    edits = [
        drop_tensor,
        lambda d: (d / "config.json").unlink(),
        lambda d: (d / "config.json").write_text("{not json"),
        lambda d: (d / "config.json").write_text("[]"),
        lambda d: (d / "config.json").write_bytes(b"\xff\xfe"),
        cfg_edit(model_type="no_such_model"),
        cfg_edit(hidden_size="abc"),
        cfg_edit(vocab_size=7),
        cfg_edit(num_hidden_layers=5),
        cfg_edit(intermediate_size=64),
        lambda d: (d / "model.safetensors").unlink(),
        truncate("model.safetensors", lambda n: rng.randrange(8, n - 1)),
        truncate("model.safetensors", lambda n: 4),
        lambda d: (d / "model.safetensors").write_bytes(bytes(rng.randrange(256) for _ in range(4096))),
        lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
        lambda d: ((d / "tokenizer.json").unlink(), (d / "tokenizer_config.json").unlink()),
        lambda d: (d / "tokenizer.json").write_text("{broken"),
        lambda d: (d / "tokenizer.json").write_text("{}"),
        lambda d: (d / "tokenizer_config.json").write_text("{broken"),
    ]
    paths = []
    for i in range(n):
        d = tmp / f"model{i}"
        shutil.copytree(base, d)
        edits[i % len(edits)](d)
        paths.append(str(d))
    return paths


REWARD_SPECS = [
    "{name: nope}", "{name: math2}", "{name: 'no_such_module:fn'}", "{name: 'os:no_such_fn'}",
    "{name: ':fn'}", "{name: 'module:'}", "{name: 'tests.faults.fuzz_rewards:NOT_A_FUNCTION'}",
    "{name: 'tests.faults.fuzz_rewards:returns_nan'}", "{name: 'tests.faults.fuzz_rewards:returns_inf'}",
    "{name: 'tests.faults.fuzz_rewards:returns_text'}", "{name: 'tests.faults.fuzz_rewards:returns_none'}",
    "{name: 'tests.faults.fuzz_rewards:returns_list'}", "{name: 'tests.faults.fuzz_rewards:raises'}",
    "{name: 'tests.faults.fuzz_rewards:wrong_arity'}", "{name: 'tests.faults.fuzz_rewards:exits'}",
    "{name: format, kwargs: {pattern: '(['}}", "{name: format, kwargs: {flags: 'q'}}",
    "{name: format, kwargs: {nope: 1}}", "{name: exact, weight: nan}", "{name: exact, weight: abc}",
    "{name: exact, weight: inf}", "{name: exact, extra: 1}", "{name: ''}", "{name: [exact]}",
]


def reward_cases(rng: random.Random) -> list[str]:
    cases = [f"reward.functions=[{s}]" for s in REWARD_SPECS]
    cases += [f"reward.functions=[{{name: exact}}, {s}]" for s in rng.sample(REWARD_SPECS, 8)]
    cases += ["reward.functions=[]", "reward.functions=nope", "reward.functions=[1, 2]"]
    return cases


# ---- the test ---------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_fuzzed_bad_input_exits_2_with_one_line_or_is_accepted(tmp_path, capsys, monkeypatch):
    import system.train

    rng = random.Random(SEED)
    model = debug_model_dir()
    monkeypatch.chdir(tmp_path)  # relative output_dir values land here, not in the repository
    stub = _Stub()
    monkeypatch.setattr(system.train, "train", stub)
    good_data = _write(tmp_path / "good.jsonl", _jsonl(GOOD_ROWS))
    counter = iter(range(10**6))

    def argv(*overrides, config=DEBUG, model_path=model, data=good_data):
        return ["--config", config, f"output_dir={tmp_path / 'out' / str(next(counter))}",
                f"model.path={model_path}", "data.source=file", f"data.train_path={data}",
                "data.prompt_field=question", "eval.size=4", *overrides]

    groups = {
        "config": [argv(*c) for c in config_cases(rng, 130)],
        "yaml": [argv(config=p) for p in yaml_cases(tmp_path, rng, 12)],
        "data": [argv(data=p) for p in data_cases(tmp_path, rng, 40)],
        "model": [argv(model_path=p) for p in model_cases(tmp_path, rng, 38)],
        "reward": [argv(c) for c in reward_cases(rng)],
    }
    # what a refusal must name: the input that was mutated
    names = {"yaml": "config error: config file ", "model": "config error: model.path: ",
             "reward": "config error: reward.functions", "data": "config error: data"}
    must_refuse = {"yaml", "model", "reward"}
    tally = {"tried": 0, "clean": 0, "tracebacks": 0}
    problems = []
    for group, cases in groups.items():
        for case in cases:
            verdict, detail = _run_case(capsys, stub, case)
            tally["tried"] += 1
            if verdict == "clean" and group in must_refuse and detail == "accepted":
                verdict, detail = "unclean", "a broken input was accepted"
            elif verdict == "clean" and detail != "accepted" and not detail.startswith(names.get(group, "")):
                verdict, detail = "unclean", f"refused without naming the input: {detail}"
            tally["clean"] += verdict == "clean"
            tally["tracebacks"] += verdict == "traceback"
            if verdict != "clean":
                problems.append(f"[{group}] {case[1] if group == 'yaml' else case[-1][:120]}: {detail}")
    with capsys.disabled():
        print(f"\nfuzz: tried {tally['tried']}, clean {tally['clean']}, tracebacks {tally['tracebacks']} "
              f"({', '.join(f'{g} {len(c)}' for g, c in groups.items())})")
    assert tally["tried"] >= 200
    assert not problems, "\n".join(problems[:40])
