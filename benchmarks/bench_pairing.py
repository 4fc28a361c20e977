"""How fast is cross-tokenizer pairing? ``tokenize_rows`` alone vs ``pair_samples``, serial and with workers.

The workload is built offline: the rows of ``data/quickstart/train.jsonl`` repeated to ``--rows`` rows, each
response made longer by appending the responses of the next few rows (how many varies with the repetition), so
that samples are a few hundred tokens. The student tokenizer is the one ``tools/dev/make_cross_tokenizer_student.py``
trains on that file (a different vocabulary and chat template); the teacher tokenizer is SmolLM2's when the
kdscale cache (``KDSCALE_TEST_CACHE``, default ``.kdscale_cache``) holds a ``SmolLM2-135M-Instruct*`` directory with
a tokenizer.json, else the tiny ChatML tokenizer of ``tests.fixtures``.

    python benchmarks/bench_pairing.py [--rows 3000] [--workers 1 2] [--repeat 1]

Prints rows/s and ms/row for each stage (best of ``--repeat``), and checks that every worker count gives the
results of the serial run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "data" / "quickstart" / "train.jsonl"


def make_records(num_rows: int) -> list[dict]:
    """``num_rows`` records: the quickstart rows in turn, each response followed by the next 5 to 8 responses."""
    base = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    responses = [r["response"] if "response" in r else r["messages"][-1]["content"] for r in base]
    records = []
    for i in range(num_rows):
        record = json.loads(json.dumps(base[i % len(base)]))
        num_parts = 6 + (i // len(base)) % 4
        response = " ".join(responses[(i + k) % len(base)] for k in range(num_parts))
        if "response" in record:
            record["response"] = response
        else:
            record["messages"][-1]["content"] = response
        record.pop("id", None)
        records.append(record)
    return records


def student_tokenizer(workdir: Path):
    """The tokenizer of make_cross_tokenizer_student.py's student (its smallest model), trained on the quickstart."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    path = ROOT / "tools" / "dev" / "make_cross_tokenizer_student.py"
    spec = importlib.util.spec_from_file_location("make_cross_tokenizer_student", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.make_student([DATA], workdir / "student", hidden_size=16, layers=1, heads=2)
    return AutoTokenizer.from_pretrained(out)


def teacher_tokenizer():
    """SmolLM2's tokenizer from the kdscale cache, else the tiny test tokenizer; and its name."""
    from transformers import AutoTokenizer

    cache = Path(os.environ.get("KDSCALE_TEST_CACHE", ROOT / ".kdscale_cache"))
    for candidate in sorted(cache.glob("SmolLM2-135M-Instruct*")) if cache.is_dir() else []:
        if (candidate / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(candidate), candidate.name
    from tests.fixtures import make_tiny_tokenizer

    return make_tiny_tokenizer(), "tests.fixtures.make_tiny_tokenizer()"


def best_time(fn, repeat: int):
    """The result of ``fn()`` and the least wall time of ``repeat`` calls."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def same_results(a, b) -> bool:
    """Two ``pair_samples`` results are identical (samples, teacher samples in order, report)."""
    import numpy as np

    (samples_a, teachers_a, report_a), (samples_b, teachers_b, report_b) = a, b

    def key(sample):
        return (
            sample.sample_id,
            sample.input_ids.tolist(),
            sample.loss_mask.tolist(),
            (None if sample.kd_mask is None else np.asarray(sample.kd_mask).tolist()),
        )

    return (
        [key(s) for s in samples_a] == [key(s) for s in samples_b]
        and list(teachers_a) == list(teachers_b)
        and [key(t) for t in teachers_a.values()] == [key(t) for t in teachers_b.values()]
        and report_a == report_b
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pair_samples num_workers values")
    parser.add_argument("--repeat", type=int, default=1, help="runs per stage; the best is printed")
    args = parser.parse_args(argv)

    from kdscale.algorithms.cross_tokenizer import pair_samples
    from kdscale.data import rows_from_records, tokenize_rows

    with tempfile.TemporaryDirectory(prefix="kdscale-bench-pairing-") as tmp:
        student = student_tokenizer(Path(tmp))
    teacher, teacher_name = teacher_tokenizer()
    rows, _ = rows_from_records(make_records(args.rows), source="bench")

    def tokenize():
        return tokenize_rows(rows, student, max_seq_len=args.max_seq_len)[0]

    samples, tokenize_s = best_time(tokenize, args.repeat)
    num_tokens = sum(len(s) for s in samples)
    print(
        f"{len(rows)} rows, {num_tokens / len(samples):.0f} student tokens/sample; student: make_student "
        f"({len(student)} entries), teacher: {teacher_name} ({len(teacher)} entries); {os.cpu_count()} CPUs"
    )
    print(" | ".join(("stage", "seconds", "rows/s", "ms/row", "aligned")))

    def line(stage: str, seconds: float, aligned: str = "") -> None:
        print(
            f"{stage:<26} | {seconds:7.2f} | {len(rows) / seconds:6.0f} | {1e3 * seconds / len(rows):6.3f} | {aligned}"
        )

    line("tokenize_rows", tokenize_s)
    reference = None
    for workers in args.workers:
        pair = functools.partial(
            pair_samples, rows, samples, student, teacher, max_seq_len=args.max_seq_len, num_workers=workers
        )
        result, seconds = best_time(pair, args.repeat)
        line(f"pair_samples workers={workers}", seconds, f"{result[2].aligned_fraction:.1%}")
        if reference is None:
            reference = result
        elif not same_results(reference, result):
            print(f"pair_samples with num_workers={workers} differs from num_workers={args.workers[0]}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
