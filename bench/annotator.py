"""Speed and quality of the report annotator (gateway/annotations/annotator.py).

    .venv/bin/python bench/annotator.py --dictionary ~/bench100k/umls_csv
    .venv/bin/python bench/annotator.py --gold tests/fixtures/annotator_gold.jsonl

Speed: builds the annotator from the names of a SemEHR cui.csv (`cui|tui|tuigroup|cuilabel`: one name per
concept, its preferred one; default the sample dictionary; the shared benchmark generator's 100,000-concept
one is made with `(cd ../shared/bench && python3 gen_fast.py ~/bench100k 1000)`), then annotates every
*.txt report of --reports (default the 4,999 mtsamples reports of ../shared/data/mtsamples/docs beside the
project) in one process with annotate_many. Prints the build seconds, reports/s, annotations and the
process's peak RSS.

Quality (--gold FILE): annotates each sentence of a hand-annotated JSON-lines file (one sentence a line:
`doc`, `text`, `annotations`: each `cui`, `str`, `start`, `end`, `negation`, `experiencer`, `temporality`)
with the --dictionary (default the sample one, which the gold set is labelled with) and prints precision,
recall and F1 of the concepts found (same cui and span), and of each qualifier over the mentions found in
both: negation (Negated), experiencer (Other), temporality (historical and hypothetical, together and each).
tests/test_annotator.py holds the same scores (gold_scores) above floors.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout that is not pip-installed

from gateway.annotations.annotator import Annotator, gold_scores, read_gold  # noqa: E402
from gateway.annotations.names import Term  # noqa: E402
from gateway.annotations.dictionary import CUI_CSV, SAMPLE_DIRECTORY, _Reader, semantic_groups  # noqa: E402

REPORTS = ROOT.parent / "shared" / "data" / "mtsamples" / "docs"


def dictionary_terms(path=SAMPLE_DIRECTORY):
    """The terms of a cui.csv, or of the cui.csv in a folder: each concept's name, with the type of its first TUI."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if path.is_file() and path.name != CUI_CSV.name:
        raise SystemExit(f"{path}: the dictionary file must be named {CUI_CSV.name}")
    type_of_tui = semantic_groups().type_of_tui
    terms = []
    for _line, (cui, tuis, _groups, name) in _Reader(directory, (CUI_CSV,), None).records(CUI_CSV):
        if name:
            terms.append(Term(cui, name, name, type_of_tui.get(tuis.split(",")[0])))
    return terms


def report_rate(args):
    paths = sorted(args.reports.glob("*.txt"))
    if not paths:
        raise SystemExit(f"no *.txt reports in {args.reports}")
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in paths]
    terms = dictionary_terms(args.dictionary)
    started = time.perf_counter()
    annotator = Annotator(terms)
    built = time.perf_counter()
    annotations = sum(map(len, annotator.annotate_many(texts)))
    elapsed = time.perf_counter() - built
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"dictionary: {len(terms):,} names from {args.dictionary}")
    print(f"build: {built - started:.1f} s")
    print(f"reports: {len(texts):,} ({sum(map(len, texts)) / 1e6:.1f} MB) in {elapsed:.1f} s: "
          f"{len(texts) / elapsed:.0f} reports/s, {annotations:,} annotations")
    print(f"peak RSS: {peak_mib:.0f} MiB (the reports' text included)")


def report_gold(args):
    gold = read_gold(args.gold)
    scores = gold_scores(gold, Annotator(dictionary_terms(args.dictionary)))
    mentions = sum(len(sentence["annotations"]) for sentence in gold)
    print(f"gold: {len(gold)} sentences, {mentions} mentions; dictionary {args.dictionary}")
    for name, score in scores.items():
        print(f"{name:<26} {score}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dictionary", type=Path, default=SAMPLE_DIRECTORY, metavar="DIR_OR_CUI_CSV")
    parser.add_argument("--reports", type=Path, default=REPORTS, metavar="DIR")
    parser.add_argument("--gold", type=Path, metavar="FILE", help="score the annotator on this gold set instead")
    args = parser.parse_args()
    if args.gold:
        report_gold(args)
    else:
        report_rate(args)


if __name__ == "__main__":
    main()
