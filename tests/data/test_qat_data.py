"""QAT data the way users have it: a local dataset directory (save_to_disk) standing in for a hub
dataset, several generations per row with the dataset's own verification fields, long traces,
and formatting checked against a Qwen3-style chat template."""

import json
import subprocess
import sys

import pytest

from reasoning_qat.data.qat_data import TraceSpec, open_dataset, select_traces, tokenize_traces
from reasoning_qat.data.reasoning import IGNORE_INDEX, format_example, generation_prompt, tokenize_example

from ..conftest import demo_recipe

# Qwen3's chat template reduced to what formatting depends on, written from its documented
# behaviour: an assistant turn's `<think>` block is split off and re-rendered as
# '<think>\n' + reasoning + '\n</think>\n\n' + answer; enable_thinking=false pre-fills an empty block.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture
def qwen3_tok(tokenizer):
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def test_qwen3_template_thinking_on_and_off(qwen3_tok):
    assert generation_prompt(qwen3_tok, "q") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert generation_prompt(qwen3_tok, "q", enable_thinking=False).endswith("assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("response", [
    "<think>\n1+1=2\n</think>\n\nSo \\boxed{2}.",
    "<think>\n\n1+1=2\n\n</think>\nSo \\boxed{2}.",  # R1-style whitespace: normalised as Qwen3 renders its turns
    "1+1=2\n</think>\n\nSo \\boxed{2}.",  # the opening tag left out (some R1 dumps): added back, not doubled
])
def test_a_response_with_its_own_thinking_is_formatted_as_qwen3_sees_its_generations(qwen3_tok, response):
    prompt, completion = format_example(qwen3_tok, "What is 1+1?", response)
    full = qwen3_tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"},
                                          {"role": "assistant", "content": response}], tokenize=False)
    assert prompt + completion + "\n" == full
    assert completion == "<think>\n1+1=2\n</think>\n\nSo \\boxed{2}.<|im_end|>"
    assert (prompt + completion).count("<think>") == 1 and (prompt + completion).count("</think>") == 1


def test_a_template_that_opens_the_thinking_itself_gets_no_second_tag(qwen3_tok):
    """Thinking-only templates end the generation prompt with '<think>\\n' (Qwen3-2507 style)."""
    qwen3_tok.chat_template = QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    prompt, completion = format_example(qwen3_tok, "q", "<think>\nstep\n</think>\n\n\\boxed{2}")
    assert prompt.endswith("<think>\n") and completion == "step\n</think>\n\n\\boxed{2}<|im_end|>"


def test_loss_mask_covers_thinking_answer_and_end_of_turn(qwen3_tok):
    ex = tokenize_example(qwen3_tok, "q", "<think>\nstep\n</think>\n\n\\boxed{2}")
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert qwen3_tok.decode(trained) == "<think>\nstep\n</think>\n\n\\boxed{2}<|im_end|>"
    masked = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX]
    assert qwen3_tok.decode(masked) == generation_prompt(qwen3_tok, "q")
    assert ex["input_ids"][-1] == qwen3_tok.convert_tokens_to_ids("<|im_end|>")


ROWS = [  # OpenR1-shaped: several generations, per-generation verification and completeness flags
    {"problem": "p0", "answer": "2", "generations": ["<think>\nwrong\n</think>\n\n\\boxed{3}", "<think>\nok\n</think>\n\n\\boxed{2}"],
     "correctness_math_verify": [False, True], "is_reasoning_complete": [True, True]},
    {"problem": "p1", "answer": "5", "generations": ["<think>\nno\n</think>\n\n\\boxed{4}"],
     "correctness_math_verify": [False], "is_reasoning_complete": [True]},
    {"problem": "p2", "answer": "7", "generations": ["<think>\nunfinished", "<think>\n" + "long " * 40 + "\n</think>\n\n\\boxed{7}"],
     "correctness_math_verify": [True, True], "is_reasoning_complete": [False, True]},
]


@pytest.fixture
def disk_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "openr1_like"
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(path))
    return str(path)


def _data(**kw):
    base = dict(source="unused", prompt_field="problem", response_field="generations")
    return TraceSpec(**{**base, **kw})


@pytest.mark.parametrize("select,fields,expected", [
    ("first", {}, ["wrong", "no", "unfinished"]),
    ("all", {}, ["wrong", "ok", "no", "unfinished", "long"]),
    ("verified", {"verified_field": "correctness_math_verify", "complete_field": "is_reasoning_complete"}, ["ok", "long"]),
    ("verified", {}, ["ok", "long"]),  # no fields named: graded against `answer` (the unfinished trace has no answer)
])
def test_trace_selection(disk_dataset, select, fields, expected):
    rows = select_traces(open_dataset(disk_dataset), _data(select=select, **fields))
    kept = [r["response"].split("\n")[1].split()[0] for r in rows if r["status"] == "kept"]
    assert kept == expected
    dropped = [r["prompt"] for r in rows if r["status"] != "kept"]
    assert dropped == (["p1"] if select == "verified" else [])


def test_length_policy_drops_or_truncates_and_reports(disk_dataset, tokenizer):
    rows = select_traces(open_dataset(disk_dataset), _data(select="verified", verified_field="correctness_math_verify",
                                                          complete_field="is_reasoning_complete"))
    lengths = sorted(len(tokenize_example(tokenizer, r["prompt"], r["response"])["input_ids"]) for r in rows if r["status"] == "kept")
    cut = lengths[0] + 1  # the short trace fits, the long one does not
    kept, stats = tokenize_traces(rows, tokenizer, _data(max_length=cut))
    assert len(kept) == 1 and stats["kept"] == 1 and stats["truncated"] == 0
    assert stats["dropped"] == {"longer than max_length": 1, "no verified trace": 1}
    assert stats["tokens"] == {"p50": lengths[1], "p90": lengths[1], "max": lengths[1], "max_length": cut}
    kept, stats = tokenize_traces(rows, tokenizer, _data(max_length=cut, overlength="truncate"))
    assert len(kept) == 2 and stats["truncated"] == 1 and max(len(x) for x in kept["input_ids"]) == cut


def test_max_samples_is_applied_before_any_row_is_read(disk_dataset):
    ds = open_dataset(disk_dataset)
    rows = select_traces(ds, _data(max_samples=2))
    assert [r["prompt"] for r in rows] == ["p0", "p1"]


@pytest.mark.slow
def test_pipeline_records_the_data_policy_and_trains_on_the_calibrate_copy(tmp_path):
    """calibrate builds the QAT set once (counts in its manifest and in `rqat status`); calibration
    windows are cut from the same token sequences; qat trains on that saved copy."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    rec = demo_recipe(tmp_path, name="data", teacher_steps=20, bits="[4]", baselines="[]", qat_steps=2)
    rec.write_text(rec.read_text().replace("data: {source: demo}", "data: {source: demo, max_length: 79, overlength: drop}"))
    run = tmp_path / "runs" / "data"
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher,calibrate,ptq,qat"],
                   check=True, capture_output=True)
    stats = json.loads((run / "calibrate" / "manifest.json").read_text())["metrics"]["qat_data"]
    assert stats["rows"] == 720 and stats["kept"] + stats["dropped"]["longer than max_length"] == 720
    assert 0 < stats["kept"] < 720 and stats["tokens"]["max"] > 79 >= stats["tokens"]["p50"] - 5
    saved = load_from_disk(str(run / "calibrate" / "qat_data"))
    assert len(saved) == stats["kept"] and max(len(x) for x in saved["input_ids"]) <= 79
    windows = load_file(str(run / "calibrate" / "calibration.safetensors"))["main"]
    stream = [t for x in saved["input_ids"] for t in x]
    text = ",".join(map(str, stream)) + ","
    assert ",".join(map(str, windows[0, :40].tolist())) in text  # a calibration window is QAT data
    status = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "status", str(run)], capture_output=True, text=True)
    assert f"qat data: {stats['kept']} of 720 kept (first)" in status.stdout
    assert json.loads((run / "qat" / "manifest.json").read_text())["metrics"]["w4-qat"]["steps"] == 2


def test_chain_task_works_every_column_and_splits_by_problem():
    """The organism's task: each step's column work (digits, carries, borrows) reproduces the step's
    result, the answer is the last value, thinking is 100-350 characters, train and test share no
    problem."""
    import re

    from reasoning_qat.data.arithmetic import split_chain_problems

    train, test = split_chain_problems(3000, 0.4, seed=1)
    assert len(test) == 1200 and not {p.problem for p in train} & {p.problem for p in test}
    for p in train[:300] + test[:300]:
        thinking = p.response.split("<think>\n")[1].split("\n</think>")[0]
        assert 100 <= len(thinking) <= 350
        v = p.start
        for line, (op, n), nxt in zip(thinking.splitlines(), p.steps, p.values()):
            head, cols, result = re.match(r"(\d+[+-]\d+): (.*) -> (\d+)$", line).groups()
            assert head == f"{v}{op}{n}" and int(result) == nxt == (v + n if op == "+" else v - n) >= 0
            digits = [int(c.split("=")[1].split()[0]) % 10 for c in cols.split(", ")]
            carry_out = cols.endswith("c1")
            assert int(("1" if carry_out else "") + "".join(map(str, reversed(digits)))) == nxt  # the column work is the result
            v = nxt
        assert p.answer == str(v) and p.response.endswith(f"\\boxed{{{v}}}.")


def test_chain_step_range_and_compact_trace():
    """min/max_steps bound the steps; the compact trace writes one `a+b=c` line per step (the
    carries left to the network) and ends at the same answer as the column trace."""
    from reasoning_qat.data.arithmetic import chain_problems

    cols, compact = chain_problems(400, 3, 4, 8), chain_problems(400, 3, 4, 8, "compact")
    assert {len(p.steps) for p in cols} == set(range(4, 9))
    for a, b in zip(cols, compact):
        assert (a.start, a.steps, a.answer) == (b.start, b.steps, b.answer)
        lines = b.response.split("<think>\n")[1].split("\n</think>")[0].splitlines()
        v = b.start
        for line, (op, n), nxt in zip(lines, b.steps, b.values()):
            assert line == f"{v}{op}{n}={nxt}"
            v = nxt
        assert len(lines) == len(b.steps) and b.response.endswith(f"\\boxed{{{b.answer}}}.")


def test_trace_style_tells_the_two_generators_apart():
    """`trace_style` names the style of a response's thinking: each style's own traces, a thinking left
    open (cut by max_new_tokens), a mixture, and text with no step line."""
    from reasoning_qat.data.arithmetic import chain_problems, trace_style

    for p, q in zip(chain_problems(50, 4, 4, 8), chain_problems(50, 4, 4, 8, "compact")):
        assert trace_style(p.response) == "columns" and trace_style(q.response) == "compact"
        assert trace_style(p.response.split("</think>")[0]) == "columns"  # unclosed thinking
        a, b = p.response.split("\n"), q.response.split("\n")
        assert trace_style("\n".join(a[:2] + b[2:])) == "mixed"
    assert trace_style("<think>\nI add them up.\n</think>\n\nThe answer is \\boxed{3}.") == "other"
    assert trace_style("482+359: 2+9=11 c1 ->") == "other"  # a column line cut before its result


CHAIN = """
name: chain
run_root: {root}
model:
  demo: {{task: chain, num_problems: 200, hidden_size: 64, intermediate_size: 128, num_layers: 2, train_steps: 5,
          batch_size: 8, trace: columns}}
  dtype: float32
quant: {{bits: [2], group_size: 32}}
calibration: {{num_samples: 4, seq_len: 128}}
ptq: {{method: rtn, baselines: []}}
qat:
  data: {{source: demo, demo_trace: {trace}, max_length: 512}}
export: {{formats: [dequantized]}}
eval: {{tasks: [demo_arith], backend: transformers, limit: 4}}
"""


def test_qat_data_from_another_generator_than_the_teacher(tmp_path):
    """`qat.data.demo_trace` writes the teacher's own chain problems in the other trace style (the
    teacher trains on `columns`, the QAT set is `compact`), the way the paper's QAT data come from another model."""
    from reasoning_qat.data.qat_data import load_tokenized
    from reasoning_qat.data.tokenizer import build_char_tokenizer

    rec = tmp_path / "chain.yaml"
    rec.write_text(CHAIN.format(root=tmp_path / "runs", trace="compact"))
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher,calibrate"],
                   check=True, capture_output=True)
    run = tmp_path / "runs" / "chain"
    teacher_rows = [json.loads(x) for x in (run / "teacher" / "data" / "train.jsonl").read_text().splitlines()]
    assert all(" -> " in r["response"] for r in teacher_rows)  # the teacher's columns style
    tok = build_char_tokenizer()
    qat = load_tokenized(run / "calibrate" / "qat_data")
    texts = [tok.decode(row["input_ids"]) for row in qat]
    assert len(texts) == len(teacher_rows)
    assert not any(" -> " in t for t in texts)  # compact: each step's result, no column work
    assert all(r["prompt"] in t for r, t in zip(teacher_rows, texts))  # the same problems, in the same order
    assert all(f"boxed{{{r['answer']}}}" in t for r, t in zip(teacher_rows, texts))
    # the calibrate manifest says whose traces the set (and the GPTQ calibration cut from it) holds
    calib = json.loads((run / "calibrate" / "manifest.json").read_text())["metrics"]
    assert calib["trace"] == "compact" and calib["responses"] == "dataset"


def test_demo_trace_needs_the_chain_task(tmp_path):
    import yaml

    from reasoning_qat.recipe import RecipeError, load_recipe

    path = demo_recipe(tmp_path)
    r = yaml.safe_load(path.read_text())
    r["qat"]["data"]["demo_trace"] = "compact"
    path.write_text(yaml.safe_dump(r))
    with pytest.raises(RecipeError, match="qat.data.demo_trace: trace styles exist for the demo's chain task only"):
        load_recipe(path)
