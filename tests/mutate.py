"""Mutation testing: plant one-line bugs in a module, one at a time, and count how many the tests catch.

`make mutate` (or `python -m tests.mutate [MODULE ...]`) runs mutmut on each module in turn,
in its own folder `mutants/<module>/`: only that module is mutated, and only the test files
listed for it in MODULES run. Those must call the module in the pytest process: mutmut
switches mutants inside the process, so a test that reaches the module only through a
subprocess (a `dvc repro`, a `python -m tasks...`) cannot tell which tests cover a mutant,
and the mutants it alone reaches count as "no tests", not caught.

mutmut remembers each module's results (the folder is the cache): a rerun mutates only
functions that changed since, and tests every mutant that survived the last run again,
against the tests as they are now. `--fresh` starts a module from nothing, which is what a
score worth recording needs (a weakened test does not un-kill a remembered mutant).

The score is caught / (mutants - equivalent). Caught: a test failed, timed out or crashed.
Not caught: survived, no test ran it, or left unchecked. Equivalent mutants change nothing a
caller can observe; EQUIVALENT lists each with the line its diff adds and why, and a listed
mutant is set aside only while its diff still adds that line (mutmut numbers mutants per
function, so an edit to the function can hand the name to another mutant).

`--sample N` tests a seeded random sample of N of each module's mutants instead of all of them,
for modules whose every mutant would take hours: mutmut generates all the mutants (and collects
which tests reach which function) once, the sample is drawn from the sorted mutant names with
`--seed`, and only the sampled mutants are tested. Its score is an estimate over the sample,
printed with a 95% Wilson interval, never a full run's score. A rerun with the same seed draws
the same sample while the module is unchanged, and retests the sampled mutants not yet caught.

Prints each module's score as it finishes, a table at the end and, as the last line, one
JSON object with every count. The scores recorded, with dates: docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.lib.uncertainty import wilson_interval

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_ROOT = REPO_ROOT / "mutants"
MUTMUT = Path(sys.executable).parent / "mutmut"

# The modules where a silent bug costs the most, and the test files that call each in process.
MODULES: dict[str, list[str]] = {
    # The promotion gate and the statistics it trusts.
    "tasks/handoff/gate.py": ["tests/tasks/handoff/test_gate.py", "tests/tasks/handoff/test_gate_mutants.py",
                              "tests/tasks/handoff/test_approval_gate.py"],
    "tasks/lib/uncertainty.py": ["tests/tasks/lib/test_uncertainty.py", "tests/tasks/lib/test_uncertainty_mutants.py",
                                 "tests/tasks/handoff/test_gate.py"],
    # The numbers the handoff depends on: evaluate, export, predict and the ONNX scorer.
    "tasks/evaluate.py": ["tests/tasks/test_evaluate.py", "tests/tasks/test_probability_oracle.py",
                          "tests/tasks/test_abstention.py"],
    "tasks/export.py": ["tests/tasks/test_export.py", "tests/tasks/test_probability_oracle.py",
                        "tests/tasks/test_abstention.py"],
    "tasks/handoff/predict.py": ["tests/tasks/handoff/test_predict.py", "tests/tasks/test_abstention.py"],
    # The feature distance and the abstention threshold: fitted, cut and handed to export.
    "tasks/lib/abstention.py": ["tests/tasks/test_abstention.py", "tests/tasks/test_abstention_mutants.py"],
    # Not test_export.py: its exports of three networks cost about 40 s a mutant on 2 cores.
    "tasks/lib/onnx_classifier.py": ["tests/tasks/lib/test_onnx_classifier.py", "tests/tasks/handoff/test_predict.py",
                                     "tests/tasks/test_probability_oracle.py",
                                     "tests/tasks/lib/test_onnx_classifier_mutants.py"],
    # The caches' keys: a field left out reuses stale pixels or features.
    "tasks/lib/row_store.py": ["tests/tasks/lib/test_row_store.py", "tests/tasks/test_cache_keys.py",
                               "tests/tasks/test_decode_cache.py", "tests/tasks/lib/test_row_store_pruning.py"],
    "tasks/training/features.py": ["tests/tasks/training/test_features.py", "tests/tasks/test_cache_keys.py",
                                   "tests/tasks/training/test_features_mutants.py"],
    # The training loop: the best epoch kept, early stopping.
    "tasks/training/loop.py": ["tests/tasks/test_train.py", "tests/tasks/training/test_state.py",
                               "tests/tasks/training/test_loop_mutants.py"],
    # The flow's stage runner and `make demo`'s fast path.
    "flows/dvc_runner.py": ["tests/flows/test_dvc_runner.py", "tests/flows/test_dvc_runner_mutants.py"],
    # Not test_retrain.py or test_fast_path.py: their `dvc repro` of the real stages costs minutes a mutant.
    "flows/retrain.py": ["tests/flows/test_retrain_mutants.py"],
    "flows/demo.py": ["tests/flows/test_fast_path.py"],
}

# mutant name -> (a line its diff adds, why no caller can tell it from the original). "In practice": a caller
# could tell only at one exact float, the edge of a float-noise allowance, which no metric lands on.
GATE, STATS, PREDICT = "tasks.handoff.gate.", "tasks.lib.uncertainty.", "tasks.handoff.predict."
EVALUATE, ONNX, EXPORT = "tasks.evaluate.", "tasks.lib.onnx_classifier.", "tasks.export."
FEATURES, ROWS = "tasks.training.features.", "tasks.lib.row_store."
RUNNER, RETRAIN = "flows.dvc_runner.", "flows.retrain."
EQUIVALENT: dict[str, tuple[str, str]] = {
    GATE + "x__check__mutmut_1": (
        'def _check(name: str, ok: bool, reason: str = "XXXX", **detail: Any) -> dict[str, Any]:',
        "the default reason is used only by a check that passed, whose reason is always empty"),
    GATE + "x__check_bootstrap__mutmut_5": (
        'return _check("bootstrap", None, f"bootstrap: first model of {name} waits for a manual "',
        "_check records bool(ok): None and False are the same failed check"),
    GATE + "x__check_lift__mutmut_26": (
        'return _check("baseline_lift", None, "the test metrics have no baseline_accuracy; re-run evaluate "',
        "_check records bool(ok): None and False are the same failed check"),
    GATE + "x__check_significance__mutmut_3": (
        'return _check("significance", None, "no paired test: production\'s predictions on this test split are "',
        "_check records bool(ok): None and False are the same failed check"),
    GATE + "x_decide__mutmut_21": (
        'checks.append(_check("production_scored", None, production_unscored))',
        "_check records bool(ok): None and False are the same failed check"),
    GATE + "x__check_significance__mutmut_19": (
        'ok = paired["wins"] >= paired["losses"] and paired["p_value"] < significance',
        "as many wins as losses gives McNemar p = 1, never below gate.significance (which must be < 1)"),
    GATE + "x__check_improvement__mutmut_9": (
        "ok = delta is not None and math.isfinite(delta) and delta > 0 and delta > gate.min_delta - 1e-12",
        "in practice: differs only when delta is exactly min_delta - 1e-12, the edge of the float-noise allowance"),
    GATE + "x__check_class_recalls__mutmut_36": (
        'checks.append(_check(f"recall[{name}]", drop < gate.max_class_drop + 1e-12,',
        "in practice: differs only when a drop is exactly max_class_drop + 1e-12, the edge of the float-noise "
        "allowance"),
    GATE + "x__check_lift__mutmut_42": (
        "ok = lift - gate.min_lift_over_baseline >= 1e-9   # strictly more: a tie with the baseline does not beat it",
        "in practice: differs only when the lift is exactly 1e-9 above the limit, the edge of the float-noise "
        "allowance"),
    GATE + "x_class_difference__mutmut_31": (
        'what = "; ".join(parts) or ("same names in another order" if mine or theirs else "class list unknown")',
        "reached only when both lists hold the same names, so one is empty exactly when the other is"),
    STATS + "x_binomial_two_sided__mutmut_2": (
        "if n == 1:",
        "the sum gives p = 1 for n = 0 as well, and the early return gives p = 1 for n = 1 as the sum does"),
    STATS + "x_bootstrap_macro_f1__mutmut_19": (
        "picks = np.random.default_rng(seed).integers(n, size=(samples, n))",
        "numpy's integers(n) draws from [0, n) like integers(0, n), the same numbers from the same seed"),
    PREDICT + "x__image_files__mutmut_11": (
        "if entry.is_dir(follow_symlinks=None):",
        "os.DirEntry.is_dir takes follow_symlinks as a truth value: None is False"),
    PREDICT + "x__predict_batch__mutmut_16": (
        'results[i]["error"] = f"{err.reason}: {err.detail}" if (err.detail) or True else err.reason',
        "every BadImage the image loader raises has a detail (each reason, and every truncation of every format)"),
    PREDICT + "x__predict_batch__mutmut_27": (
        "for (i, _), row in zip(ready, probs, strict=None):",
        "Classifier.probabilities raises ModelError unless it returns exactly one row per image"),
    PREDICT + "x__predict_batch__mutmut_30": (
        "for (i, _), row in zip(ready, probs, ):",
        "Classifier.probabilities raises ModelError unless it returns exactly one row per image"),
    PREDICT + "x__predict_batch__mutmut_31": (
        "for (i, _), row in zip(ready, probs, strict=False):",
        "Classifier.probabilities raises ModelError unless it returns exactly one row per image"),
    PREDICT + "x__predict_batch__mutmut_39": (
        'best = np.argsort(-row, kind="STABLE")[:k]',
        "numpy reads a sort kind case-insensitively: STABLE is the same stable sort"),
    EVALUATE + "x_calibration_metrics__mutmut_12": (
        "raw = compute_metrics(raw_probs, labels, class_names, 2, bins)",
        "only the raw softmax's ece and log_loss are kept, and top_k changes neither"),
    EVALUATE + "x__message_image__mutmut_14": (
        'img = Image.new("RGB", (4 * TILE, 40), "WHITE")',
        "Pillow reads colour names case-insensitively: WHITE is white"),
    EVALUATE + "x__message_image__mutmut_25": (
        'ImageDraw.Draw(img).text((8, 12), text, fill="BLACK")',
        "Pillow reads colour names case-insensitively: BLACK is black"),
    EXPORT + "xǁCalibratedǁ__init____mutmut_7": (
        'self.register_buffer("temperature", torch.tensor(float(temperature)), )',
        "the wrapper's state_dict is never saved or loaded: the temperature reaches the ONNX graph the same way"),
    EVALUATE + "x_write_mistakes_grid__mutmut_97": (
        'draw.text((x + 2, y + TILE + 16), f"pred: {class_names[pred]} {probs[i, pred]:.2f}"[:22], fill="red")',
        "the prediction's caption one pixel lower: still inside the 30 px caption, read the same"),
    ONNX + "x_ort_session__mutmut_1": (
        "def ort_session(path: Path | str, threads: int = 1) -> ort.InferenceSession:",
        "the default is never used: load_classifier, the one caller, always passes threads"),
    ONNX + "x_ort_session__mutmut_8": (
        'return ort.InferenceSession(str(path), options, providers=None)',
        "the pinned onnxruntime is the CPU build: with no providers named it picks CPUExecutionProvider alone"),
    ONNX + "x_ort_session__mutmut_11": (
        'return ort.InferenceSession(str(path), options, )',
        "the pinned onnxruntime is the CPU build: with no providers named it picks CPUExecutionProvider alone"),
    ONNX + "xǁClassifierǁscore_files__mutmut_1": (
        "def score_files(self, paths: Sequence[Path], batch_size: int = 65, limits: ImageLimits | None = None",
        "in practice: batches only group images per onnxruntime call, each row comes from its own image"),
    ONNX + "x__check_output_size__mutmut_22": (
        'raise ModelError(f"{path}: the network outputs {logits.shape[1:] if (logits.ndim) or True else ()} '
        'logits but its "',
        "a 0-d output's shape[1:] is () as well"),
    EXPORT + "x_quantize_dynamic_int8__mutmut_21": (
        "quantize_dynamic(str(stripped), str(int8_path), )",
        "QuantType.QInt8 is the pinned onnxruntime's default weight_type for quantize_dynamic"),
    EXPORT + "x_maybe_quantize__mutmut_95": (
        "speed = measure_latency(int8, load_parity_images(rows, raw_dir, prep, 2)[0], cfg.latency_runs)",
        "int8 keeps only the batch-1 latency, timed on the first image either way; a second image feeds only "
        "the throughput figure, which is dropped"),
    FEATURES + "xǁRowsǁ__init____mutmut_3": (
        "self.images, self.rows = images, torch.as_tensor(list(rows), dtype=None)",
        "a list of Python ints becomes int64 either way, and Rows is made only for a non-empty list of rows"),
    RUNNER + "x__pump__mutmut_56": (
        "log.info(text)",
        "logging formats a message only when it has arguments: the line is logged as it is, % signs and all"),
    RUNNER + "x_run_streamed__mutmut_42": (
        "reader.join(timeout=31)",
        "in practice: a reader ends when the command's pipes close; the limit only bounds one still blocked after "
        "the command ended (a grandchild holding the pipe), at 30 s or 31 s"),
    RUNNER + "x__wait__mutmut_4": (
        "stop_process_group(proc, None)",
        "in practice: the guard always exits on SIGTERM, SIGKILLing its group after GUARD_GRACE_S first, so waiting "
        "for it without a limit ends as the limit of GUARD_GRACE_S + 5 s does"),
    ROWS + "x_plan_split__mutmut_15": (
        "used = np.bincount(source[reusable], )",
        "used is read only at its own nonzero indexes (sources, and kept among them), which exist without minlength"),
    ROWS + "x_plan_split__mutmut_83": (
        "kept_rows = None",
        "position[None] sets every row's position, and the next line sets the non-kept rows' again: the same array"),
    ROWS + "x_plan_split__mutmut_73": (
        "slot = np.full(max(n_files, 2), -1, dtype=np.int64)",
        "slot is read only at kept files' indexes (< n_files): a longer array changes nothing"),
    ROWS + "x_plan_split__mutmut_74": (
        "slot = np.full(max(n_files, 1), +1, dtype=np.int64)",
        "slot is read only at kept files' indexes, which are all set: the fill value is never read"),
    ROWS + "x_plan_split__mutmut_75": (
        "slot = np.full(max(n_files, 1), -2, dtype=np.int64)",
        "slot is read only at kept files' indexes, which are all set: the fill value is never read"),
    ROWS + "x__copy_range__mutmut_32": (
        "done = os.pwrite(dst, os.pread(src, min(count, 2 << 24), src_offset), dst_offset)",
        "the pread/pwrite fallback copies in pieces of 32 MiB instead of 16 MiB: the same bytes, more memory"),
    ROWS + "x__copy_range__mutmut_33": (
        "done = os.pwrite(dst, os.pread(src, min(count, 1 << 25), src_offset), dst_offset)",
        "the pread/pwrite fallback copies in pieces of 32 MiB instead of 16 MiB: the same bytes, more memory"),
    RETRAIN + "x_dvc_storage__mutmut_5": (
        'urls = [conf.get("url", None) for conf in repo.config.get("remote", {}).values()]',
        "DVC's config schema requires a url for every remote: one without is a ConfigError, answered None first"),
}

CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}
SAMPLE_SEED = 23
# A name no mutant has: `mutmut run` with it generates every mutant and collects the stats, then stops.
MATCHES_NO_MUTANT = "generate-only-no-mutant-has-this-name"


@dataclass
class Score:
    module: str
    mutants: int = 0
    caught: int = 0
    equivalent: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    stale_equivalent: list[str] = field(default_factory=list)
    sampled_from: int | None = None   # the module's mutants when only a sample of them was tested

    @property
    def judged(self) -> int:
        return self.mutants - self.equivalent

    @property
    def score(self) -> float | None:
        return self.caught / self.judged if self.judged else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% Wilson interval of the score: how far a sample's score may be from the module's."""
        return wilson_interval(self.caught, self.judged) if self.judged else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"error: no test files are listed for {', '.join(unknown)} in tests/mutate.py MODULES; "
              f"add the module with the test files that call it in process (known: {', '.join(MODULES)})",
              file=sys.stderr)
        return 2
    scores = []
    for module in modules:
        scores.append(mutate(module, jobs=args.jobs, fresh=args.fresh, sample=args.sample, seed=args.seed))
        print(summary_line(scores[-1]), flush=True)
    print("\nmutation scores (caught / (mutants - equivalent)):")
    for score in scores:
        print(summary_line(score))
        for name in score.missed:
            print(f"    not caught: {name}  (see: cd {work_dir(score.module).relative_to(REPO_ROOT)} && "
                  f"{MUTMUT} show '{name}')")
        for name in score.stale_equivalent:
            print(f"    listed as equivalent but its diff changed, counted as not caught: {name}")
    print(json.dumps([{**asdict(s), "score": s.score, "interval": s.interval} for s in scores]))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="source files, e.g. tasks/handoff/gate.py (default: all in MODULES)")
    parser.add_argument("--jobs", type=int, default=None, help="mutants tested at once (default: mutmut's, the cores)")
    parser.add_argument("--fresh", action="store_true", help="forget the modules' remembered results first")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="test a seeded random sample of N of each module's mutants, not all of them; "
                             "the score is then an estimate with a 95%% Wilson interval")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED,
                        help=f"the sample's seed (default {SAMPLE_SEED}); the same seed draws the same sample")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be at least 1 mutant, got {args.sample}")
    return args


def work_dir(module: str) -> Path:
    return WORK_ROOT / module.removesuffix(".py").replace("/", ".")


def mutate(module: str, jobs: int | None, fresh: bool, sample: int | None = None, seed: int = SAMPLE_SEED) -> Score:
    work = work_dir(module)
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    prepare_work_dir(work, module, MODULES[module])
    jobs_args = ["--max-children", str(jobs)] if jobs else []
    if sample is not None:
        return mutate_sample(module, work, jobs_args, sample, seed)
    retest = [name for name, status in results(work).items() if status not in CAUGHT]
    if retest:   # remembered survivors meet the tests as they are now; mutmut re-runs only named mutants
        mutmut(work, "run", *jobs_args, *retest)
    mutmut(work, "run", *jobs_args)
    return score(module, work)


def mutate_sample(module: str, work: Path, jobs_args: list[str], size: int, seed: int) -> Score:
    """Test only a seeded sample of the module's mutants, and score the sample."""
    generate_mutants(work)
    statuses = results(work)
    if not statuses:
        raise SystemExit(f"error: mutmut generated no mutants of {module} in {work}; its output is above")
    chosen = draw_sample(statuses, size, seed)
    retest = [name for name in chosen if statuses[name] not in CAUGHT]
    if retest:   # the sampled mutants not caught yet: never tested, or survivors meeting the tests as they are now
        mutmut(work, "run", *jobs_args, *retest)
    return score(module, work, only=chosen)


def generate_mutants(work: Path) -> None:
    """Have mutmut write every mutant of the module and record which tests reach which function, testing none.

    mutmut 3 has no command for that alone: `mutmut run` with a name no mutant has does both and then
    stops with an error that nothing matched, which is expected here, so only a missing result is an error.
    """
    proc = subprocess.run([str(MUTMUT), "run", MATCHES_NO_MUTANT], cwd=work, capture_output=True, text=True)
    if not results(work):
        print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)


def draw_sample(statuses: dict[str, str], size: int, seed: int) -> list[str]:
    """A seeded sample of the mutant names, drawn from the sorted names so that a rerun draws the same one."""
    names = sorted(statuses)
    return sorted(random.Random(seed).sample(names, min(size, len(names))))


def prepare_work_dir(work: Path, module: str, tests: list[str]) -> None:
    """The project's files as links, and its pyproject.toml with this module's mutmut settings added."""
    missing = [t for t in tests if not (REPO_ROOT / t).is_file()]
    if missing:
        raise SystemExit(f"error: tests/mutate.py lists {', '.join(missing)} for {module}, and it does not exist")
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    shared = tomllib.loads(pyproject)["tool"]["mutmut"]
    work.mkdir(parents=True, exist_ok=True)
    for name in [*shared["source_paths"], "tests", *shared.get("also_copy", [])]:
        link = work / name.rstrip("/")
        if not link.is_symlink():
            link.symlink_to(REPO_ROOT / name.rstrip("/"))
    own = f"only_mutate = {json.dumps([module])}\npytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
    header = "[tool.mutmut]\n"
    if header not in pyproject:
        raise SystemExit("error: pyproject.toml has no [tool.mutmut] table (the settings every module shares)")
    text = pyproject.replace(header, header + own, 1)
    target = work / "pyproject.toml"
    if not target.exists() or target.read_text() != text:   # unchanged settings keep mutmut's results
        target.write_text(text)


def mutmut(work: Path, *args: str) -> None:
    proc = subprocess.run([str(MUTMUT), *args], cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"error: mutmut {args[0]} failed (exit {proc.returncode}) in {work}; its output is above")


def results(work: Path) -> dict[str, str]:
    """Every mutant of the module -> mutmut's status for it ('killed', 'survived', 'no tests', ...)."""
    if not (work / "mutants").is_dir():
        return {}
    proc = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=work, capture_output=True, text=True,
                          check=True)
    found = (re.fullmatch(r"\s+(\S+): (.+)", line) for line in proc.stdout.splitlines())
    return {m[1]: m[2] for m in found if m}


def added_lines(work: Path, name: str) -> list[str]:
    diff = subprocess.run([str(MUTMUT), "show", name], cwd=work, capture_output=True, text=True, check=True).stdout
    return [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]


def score(module: str, work: Path, only: list[str] | None = None) -> Score:
    statuses = results(work)
    total = len(statuses)
    if only is not None:
        statuses = {name: statuses[name] for name in only}
    result = Score(module, mutants=len(statuses), sampled_from=None if only is None else total)
    for name, status in sorted(statuses.items()):
        result.by_status[status] = result.by_status.get(status, 0) + 1
        if status in CAUGHT:
            result.caught += 1
        elif name in EQUIVALENT and EQUIVALENT[name][0] in added_lines(work, name):
            result.equivalent += 1
        else:
            result.missed.append(name)
            if name in EQUIVALENT:
                result.stale_equivalent.append(name)
    return result


def summary_line(score: Score) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(score.by_status.items()))
    detail = f"({score.caught} of {score.judged} caught; {counts}; {score.equivalent} equivalent set aside)"
    if score.score is None:
        return f"{score.module}: n/a {detail}"
    if score.sampled_from is None:
        return f"{score.module}: {score.score:.1%} {detail}"
    low, high = score.interval
    return f"{score.module}: {score.score:.1%} [{low:.1%}, {high:.1%}] (95% Wilson interval) estimated from a " \
           f"sample of {score.mutants} of {score.sampled_from} mutants, not a full run {detail}"


if __name__ == "__main__":
    sys.exit(main())
