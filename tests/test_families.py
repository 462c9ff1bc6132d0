"""Model-family conformance: the same paths run on every family the README lists (tests/families.py):
training text and its loss mask, calibration text, verified-trace selection, RL rewards and the RL
cold-start gate, eval grading, generation stopping, and (tests/quant/test_tied_heads.py) tied heads."""

import json

import pytest
import torch

from reasoning_qat.data.calibration import domain_calibration, tokenized_rows
from reasoning_qat.data.qat_data import TraceSpec, open_dataset, select_traces
from reasoning_qat.data.reasoning import IGNORE_INDEX, format_example, generation_prompt, tokenize_example
from reasoning_qat.data.thinking import answer_text, prompt_opens_thinking
from reasoning_qat.evaluation.backends import TransformersBackend
from reasoning_qat.evaluation.runner import evaluate
from reasoning_qat.evaluation.tasks import load_task
from reasoning_qat.models import end_token_ids, saved_end_token_ids
from reasoning_qat.stages.rl import correctness_reward, format_reward, student_accuracy

from .families import FAMILIES

NAMES = list(FAMILIES)


def written(family, thinking: str, answer: str | None = None) -> str:
    """What a model of `family` writes after its generation prompt: it opens <think> itself unless the
    prompt did; `answer` None: cut off inside the thinking."""
    text = thinking if family.opens_thinking else f"<think>\n{thinking}"
    return text if answer is None else f"{text}\n</think>\n\n{answer}"


@pytest.mark.parametrize("name", NAMES)
def test_each_family_says_where_its_thinking_opens(name):
    f = FAMILIES[name]
    assert prompt_opens_thinking(generation_prompt(f.tokenizer(), "What is 3+5?")) is f.opens_thinking


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("response", [
    "<think>\n3+5=8\n</think>\n\n\\boxed{8}",  # OpenR1-style: the trace opens its own thinking
    "3+5=8\n</think>\n\n\\boxed{8}",  # teacher-written after a prompt that opened <think>
])
def test_training_text_has_one_thinking_block_and_masks_the_prompt(name, response):
    f = FAMILIES[name]
    tok = f.tokenizer()
    p_text, c_text = format_example(tok, "What is 3+5?", response)
    text = p_text + c_text
    assert text.count("<think>") == 1 and text.count("</think>") == 1, text
    assert text.index("<think>") < text.index("3+5=8") < text.index("</think>") < text.index("\\boxed{8}")
    assert c_text.endswith(tok.eos_token) and answer_text(c_text, prompt_opens_thinking(p_text)).strip().startswith("\\boxed{8}")
    ex = tokenize_example(tok, "What is 3+5?", response)
    n_prompt = len(tok(p_text, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(ex["labels"][n_prompt:], skip_special_tokens=False) == c_text
    assert ex["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_calibration_windows_are_the_training_text(name):
    f = FAMILIES[name]
    tok = f.tokenizer()
    (ex,) = tokenized_rows(tok, [{"prompt": "What is 3+5?", "response": "3+5=8\n</think>\n\n\\boxed{8}"}])
    (window,) = domain_calibration([ex], 1, len(ex["input_ids"])).tolist()
    assert tok.decode(window, skip_special_tokens=False) == "".join(format_example(tok, "What is 3+5?", "3+5=8\n</think>\n\n\\boxed{8}"))


@pytest.mark.parametrize("name", NAMES)
def test_verified_selection_skips_a_trace_cut_off_in_its_thinking(tmp_path, name):
    """The first trace stopped mid-thought with a boxed 8 in its thinking: it has no answer."""
    f = FAMILIES[name]
    path = tmp_path / "traces.jsonl"
    cut, good = written(f, "3+5 is \\boxed{8} I think"), written(f, "3+5=8", "\\boxed{8}")
    path.write_text(json.dumps({"prompt": "What is 3+5?", "answer": "8", "response": [cut, good]}) + "\n")
    (row,) = select_traces(open_dataset(str(path)), TraceSpec(source=str(path), select="verified"), tokenizer=f.tokenizer())
    assert row["status"] == "kept" and row["response"] == good


@pytest.mark.parametrize("name", NAMES)
def test_rl_rewards_read_the_answer_after_the_thinking(name):
    f = FAMILIES[name]
    prompt = generation_prompt(f.tokenizer(), "What is 3+5?")
    completions = [written(f, "3+5 is \\boxed{8} I think"), written(f, "3+5=8", "\\boxed{8}"), written(f, "3+5=9", "\\boxed{9}")]
    prompts, answers = [prompt] * 3, ["8"] * 3
    # TRL decodes completions with skip_special_tokens=True before its reward functions: the thinking
    # tags are ordinary added tokens (as in the families' own tokenizers) and survive it
    tok = f.tokenizer()
    ids = [tok(c + tok.eos_token, add_special_tokens=False)["input_ids"] for c in completions]
    assert tok.batch_decode(ids, skip_special_tokens=True) == completions
    assert correctness_reward(prompts=prompts, completions=completions, answer=answers) == [0.0, 1.0, 0.0]
    assert format_reward(prompts=prompts, completions=completions) == [0.0, 1.0, 1.0]


def _memorize(tok, prompt_text: str, completion: str, steps: int = 400):
    """A tiny real model trained until its greedy continuation of `prompt_text` is `completion` + end."""
    from .conftest import tiny_qwen3

    model = tiny_qwen3(vocab_size=len(tok), hidden=64, layers=2)
    model.generation_config.eos_token_id = tok.eos_token_id
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    labels = torch.tensor([[-100] * len(p) + c])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_cold_start_gate_and_eval_grade_a_cut_off_completion_as_wrong(tmp_path, name):
    """A real model that writes `3+5 is \\boxed{8}` inside its thinking, then closes it and answers 8:
    with the whole budget it is right in the RL gate and in eval; cut off before `</think>` it is
    wrong in both (the boxed 8 is inside unfinished thinking), whatever the family's template."""
    f = FAMILIES[name]
    tok = f.tokenizer()
    task = load_task("math500")
    user = task.prompt({"problem": "What is 3+5?"})
    completion = written(f, "3+5 is \\boxed{8}", "\\boxed{8}")
    model = _memorize(tok, generation_prompt(tok, user), completion)
    cut = len(tok(written(f, "3+5 is \\boxed{8}"), add_special_tokens=False)["input_ids"])
    rows = [{"prompt": user, "answer": "8"}]
    assert student_accuracy(model, tok, rows, max_new_tokens=64) == 1.0
    assert student_accuracy(model, tok, rows, max_new_tokens=cut) == 0.0
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"problem": "What is 3+5?", "answer": "8"}) + "\n")
    engine = TransformersBackend.from_model(model, tok)
    whole = evaluate("memorized", task, tmp_path / "whole", engine=engine, data=str(data), temperature=0.0, max_new_tokens=64)
    short = evaluate("memorized", task, tmp_path / "short", engine=engine, data=str(data), temperature=0.0,
                     max_new_tokens=cut)
    assert (whole["pass@1"], whole["truncation_rate"]) == (1.0, 0.0)
    assert (short["pass@1"], short["truncation_rate"]) == (0.0, 1.0)


def _always_emits_id0(f, tmp_path):
    """A saved model of family `f` whose logits are all zero (final norm zeroed): greedy decoding
    emits token id 0 first, an end token of the family that is not the tokenizer's eos_token where
    the family lists two (Qwen3's `<|endoftext|>`)."""
    tok = f.tokenizer()
    model = f.model(tok, hidden=128)  # head_dim 32: what vLLM's CPU attention takes
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return f.save(tmp_path / f.name, model, tok), tok


@pytest.mark.parametrize("name", NAMES)
def test_transformers_backend_stops_at_every_end_token(tmp_path, name):
    f = FAMILIES[name]
    path, tok = _always_emits_id0(f, tmp_path)
    assert tok.convert_ids_to_tokens(0) in f.end_tokens
    ends = tok.convert_tokens_to_ids(list(f.end_tokens))
    assert saved_end_token_ids(str(path), tok) == ends
    engine = TransformersBackend(str(path), batch_size=2)
    assert engine.end_ids == ends == end_token_ids(tok, engine.model.generation_config, engine.model.config)
    (c,), = engine.generate([generation_prompt(tok, "What is 3+5?")], 1, 0.0, 1.0, -1, 16)
    assert (c.text, c.num_tokens, c.truncated) == ("", 1, False)


def test_r1_distill_recipe_formats_openr1_traces_with_one_thinking_block(tmp_path):
    """recipes/r1-distill-qwen-1.5b-w3g128.yaml's data settings on OpenR1-shaped rows (several
    generations, the dataset's own correctness and completeness flags), with R1-Distill's template:
    the verified trace is kept, and its training text opens the thinking once (in the prompt)."""
    from reasoning_qat.data.qat_data import tokenize_traces
    from reasoning_qat.recipe import load_recipe
    from reasoning_qat.stages.specs import trace_spec

    from .conftest import ROOT

    data = load_recipe(ROOT / "recipes" / "r1-distill-qwen-1.5b-w3g128.yaml").qat.data
    rows = tmp_path / "openr1.jsonl"
    rows.write_text(json.dumps({"problem": "What is 3+5?", "answer": "8",
                                "generations": ["<think>\n3+5=9\n</think>\n\n\\boxed{9}", "<think>\n3+5=8\n</think>\n\n\\boxed{8}"],
                                "correctness_math_verify": [False, True], "is_reasoning_complete": [True, True]}) + "\n")
    data = trace_spec(data.model_copy(update={"source": str(rows), "max_samples": None, "num_proc": None}))
    tok = FAMILIES["r1-distill-qwen"].tokenizer()
    traces = select_traces(open_dataset(str(rows)), data, tokenizer=tok)
    assert traces["response"] == ["<think>\n3+5=8\n</think>\n\n\\boxed{8}"]
    kept, stats = tokenize_traces(traces, tok, data)
    (text,) = [tok.decode(ids, skip_special_tokens=False) for ids in kept["input_ids"]]
    assert stats["kept"] == 1 and text.count("<think>") == 1 and text.count("</think>") == 1
    assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>What is 3+5?<｜Assistant｜><think>\n3+5=8")
    assert text.endswith("\\boxed{8}<｜end▁of▁sentence｜>")
