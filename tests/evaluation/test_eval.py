"""Grading on real MATH answers, the transformers backend, pass@1 and the compare report."""

import json

import pytest

from reasoning_qat.data.reasoning import read_jsonl
from reasoning_qat.evaluation.grader import grade, grade_choice
from reasoning_qat.evaluation.runner import pass_at_1
from reasoning_qat.evaluation.tasks import Task, load_task

from ..conftest import MATH500


@pytest.mark.parametrize("response,gold,ok", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "\\frac12", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
    ("\\boxed{[2,5)}", "[2,5)", True),
    ("\\boxed{(2,5]}", "[2,5)", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("<think>maybe \\boxed{7}</think>\n\nThe answer is \\boxed{8}.", "8", True),
    ("<think>maybe \\boxed{8}</think>\n\nThe answer is \\boxed{7}.", "8", False),
    ("<think>I never finish \\boxed{8}", "8", False),  # thinking never closed (truncated): no final answer
    ("<think>8</think>", "8", False),  # closed thinking, nothing after it
    ("<think>\\boxed{8}</think>\n\nThe answer is 8.", "8", True),  # tried inside, then given after: the after counts
    ("<think>\\boxed{7}</think>\n\nSo \\boxed{8}.", "8", True),
    ("The answer is \\boxed{8}.", "8", True),  # no thinking at all: the whole text
    ("no answer at all", "8", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
])
def test_grade_math_answers(response, gold, ok):
    assert grade(response, gold).correct is ok


@pytest.mark.parametrize("response,gold,ok", [
    # percentages: a decimal as well as an integer (5.4 for 5.4\%), both ways
    ("\\boxed{5.4}", "5.4\\%", True), ("\\boxed{25}", "25\\%", True), ("\\boxed{5.4\\%}", "5.4", True),
    ("\\boxed{5.5}", "5.4\\%", False),
    # LaTeX spacing commands as digit-group separators
    ("\\boxed{1\\,000}", "1000", True), ("\\boxed{1\\ 000}", "1000", True), ("\\boxed{12\\;345\\;678}", "12345678", True),
    ("\\boxed{10{,}000}", "10000", True), ("\\boxed{1~000}", "1000", True), ("\\boxed{1\\,001}", "1000", False),
    # Unicode where the gold writes LaTeX
    ("\\boxed{90°}", "90^\\circ", True), ("\\boxed{−3}", "-3", True), ("\\boxed{2π}", "2\\pi", True),
    # ordinal superscripts
    ("\\boxed{12^{\\text{th}}}", "12", True), ("\\boxed{21^\\text{st}}", "21", True), ("\\boxed{3^{rd}}", "3", True),
    ("\\boxed{4^{\\mathrm{th}}}", "5", False), ("\\boxed{2^{10}}", "1024", True),
    # exact values compare exactly (math-verify rounds to 6 decimals and chops tiny differences)
    ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", False), ("\\boxed{\\frac{1}{2^{99}}}", "\\frac{1}{2^{99}}", True),
    ("\\boxed{1234567}", "1234568", False), ("\\boxed{\\frac{1000001}{1000000}}", "1", False),
    # a decimal the model wrote: to the gold's own precision
    ("\\boxed{0.1234568}", "0.1234567", False), ("\\boxed{0.12345670}", "0.1234567", True), ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{0.333333}", "\\frac{1}{3}", True), ("\\boxed{0.3}", "\\frac{1}{3}", False),
    # infinities: equal to themselves (their difference is nan), not to the other sign or a number
    ("\\boxed{\\infty}", "\\infty", True), ("\\boxed{∞}", "\\infty", True), ("\\boxed{-\\infty}", "-\\infty", True),
    ("\\boxed{-\\infty}", "\\infty", False), ("\\boxed{\\infty}", "5", False), ("\\boxed{5}", "\\infty", False),
])
def test_grade_forms_a_careful_human_accepts(response, gold, ok):
    assert grade(response, gold).correct is ok


@pytest.mark.parametrize("response,gold,ok", [
    ("\\boxed{\\text{(B) } 2.5 \\text{ A}}", "B", True),  # A is the unit (amperes), not a second choice
    ("\\boxed{(C) 3 V}", "C", True),
    ("\\boxed{(A) and (C)}", "A", False),
    ("\\boxed{B}", "B", True),
])
def test_grade_choice_reads_a_unit_after_the_option_as_a_unit(response, gold, ok):
    assert grade_choice(response, gold, 4).correct is ok


@pytest.mark.skipif(not MATH500.is_file(), reason="../shared/data/math500.jsonl not present")
def test_every_math500_gold_grades_correct_against_its_own_boxed_form():
    golds = [r["answer"] for r in read_jsonl(MATH500)]
    assert sum(grade(f"The answer is \\boxed{{{g}}}.", g).correct for g in golds) == 500


def test_thinking_opened_by_the_prompt_must_close():
    """Templates that end the prompt with <think> leave the response without an opening tag."""
    assert grade("so it is \\boxed{8}", "8", thinking_open=True).correct is False
    assert grade("so 8</think>\n\n\\boxed{8}", "8", thinking_open=True).correct is True


@pytest.mark.skipif(not MATH500.is_file(), reason="../shared/data/math500.jsonl not present")
def test_math500_loader_and_gold_solutions_grade_correct():
    task = load_task("math500").model_copy(update={"source": str(MATH500)})
    rows = task.load()
    assert len(rows) == 500 and rows[0]["id"] == 0
    solutions = {r["index"]: r["solution"] for r in read_jsonl(MATH500)}
    # The worked solutions end in \\boxed{gold}: the grader must accept nearly all of them.
    sample = rows[::5]
    correct = sum(grade(solutions[r["id"]], r["answer"]).correct for r in sample)
    assert correct / len(sample) >= 0.95, correct
    # ...and reject them against another problem's answer.
    wrong = sum(grade(solutions[r["id"]], rows[(i + 7) % 500]["answer"]).correct for i, r in enumerate(sample))
    assert wrong / len(sample) < 0.1


def test_pass_at_1_and_interval():
    acc, ci = pass_at_1([[True, False], [True, True], [False, False], [True, False]])
    assert acc == pytest.approx(0.5)
    assert 0 < ci < 0.6
    assert pass_at_1([[True]] * 10) == (1.0, 0.0)


def test_unknown_task_is_a_clear_error():
    """The library names its own key; a recipe reads it as eval.tasks, `rqat eval` as --task."""
    from reasoning_qat.api import flag_names
    from reasoning_qat.errors import SpecError, UserError
    from reasoning_qat.recipe import RecipeError
    from reasoning_qat.stages.specs import recipe_keys

    with pytest.raises(SpecError, match="^tasks: unknown task 'nope' \\(known: .*math500"):
        load_task("nope")
    with pytest.raises(RecipeError, match="^eval.tasks: unknown task 'nope'"), recipe_keys("eval"):
        load_task("nope")
    with pytest.raises(UserError, match="^--task: unknown task 'nope'"), flag_names():
        load_task("nope")


def test_transformers_backend_on_a_local_model(saved_tiny, tmp_path):
    """Real generation with a saved model; an untrained model gets ~0, and every output is recorded."""
    from reasoning_qat.evaluation.runner import evaluate

    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is ({a}+1)*2?", "answer": str((a + 1) * 2)}) for a in range(6)))
    task = Task(name="t", source=str(data), problem_field="prompt", answer_field="answer", samples=2,
                sampling={"temperature": 0.7, "top_p": 0.95, "top_k": 20, "max_new_tokens": 8})
    m = evaluate(str(saved_tiny), task, tmp_path / "out", backend="transformers", batch_size=4)
    assert m["problems"] == 6 and m["samples_per_problem"] == 2
    assert m["truncation_rate"] == pytest.approx(1.0) or m["mean_response_tokens"] <= 8
    rows = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"response", "extracted", "correct", "num_tokens"} <= set(rows[0])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["pass@1"] == m["pass@1"]


def test_static_cache_generation_equals_the_dynamic_cache(saved_tiny):
    """The static-cache path (what GPUs run, compiled there) pads prompts to multiples of 64 and the
    last batch to full size; the completions it returns are the dynamic cache's, row for row."""
    from reasoning_qat.evaluation.backends import EngineSettings, TransformersBackend

    prompts = [f"What is {a}*{a + 3}?" + " pad" * (a % 3) for a in range(5)]
    outs = {}
    for static in (False, True):
        backend = TransformersBackend(str(saved_tiny), batch_size=3, settings=EngineSettings(static_cache=static),
                                      device="cpu")
        assert backend.static_cache is static
        assert ("cache_implementation" in backend._cache_kwargs(3, 10, 12)) is static
        outs[static] = backend.generate(prompts, k=1, temperature=0, top_p=1.0, top_k=0, max_new_tokens=12)
    assert len(outs[True]) == 5
    assert [c[0].text for c in outs[True]] == [c[0].text for c in outs[False]]
    assert [c[0].num_tokens for c in outs[True]] == [c[0].num_tokens for c in outs[False]]


def test_generation_keeps_the_kv_cache_on_for_a_checkpoint_saved_with_it_off(saved_tiny):
    """A checkpoint a Trainer saved carries use_cache: false; the transformers backend asks for the
    cache anyway, so each decoding step feeds one new token, not the whole prefix again."""
    import json

    from reasoning_qat.evaluation.backends import TransformersBackend

    for name in ("config.json", "generation_config.json"):  # as a Trainer-trained model is saved
        f = saved_tiny / name
        f.write_text(json.dumps({**(json.loads(f.read_text()) if f.is_file() else {}), "use_cache": False}))
    backend = TransformersBackend(str(saved_tiny), batch_size=2, device="cpu")
    assert backend.model.config.use_cache is False and backend.model.generation_config.use_cache is False
    lengths = []
    backend.model.model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    backend.generate(["What is 2+3?", "What is 4*5?"], k=1, temperature=0, top_p=1.0, top_k=0, max_new_tokens=8)
    assert len(lengths) > 2 and lengths[0] > 1 and set(lengths[1:]) == {1}
