"""The report annotator: finds the concepts of a dictionary in report text and qualifies each mention, as
SemEHR does, with medspaCy on spaCy's blank English pipeline (no model to download).

- Sentences: spaCy's rule-based sentencizer, and a blank line ends a sentence too (headings and list items
  stand on lines of their own without a full stop). medspaCy's PyRuSH splitter would cap the annotator near
  10 reports/s.
- Mentions: medspaCy's TargetMatcher with one literal rule per distinct name (preferred names and synonyms),
  matched on the lower-cased tokens, so case-insensitively and on token boundaries; of overlapping mentions
  the longest wins (spaCy's filter_spans). A name of several concepts gives an annotation for each.
- Qualifiers: medspaCy's ConText with the rules of context_rules.json (or another file of that form).

Plain Python: no Flask, no store. A text longer than spaCy's nlp.max_length (1,000,000 characters) is a
ValueError.
"""
import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

with warnings.catch_warnings():
    # importing medspacy runs warnings.filterwarnings("ignore"), which would silence every warning of the
    # process; spaCy 3.7 imports a click helper that click 8.5 deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    import spacy
    # (the medspacy package registers its components, "medspacy_context" among them, when imported)
    from medspacy.target_matcher import TargetMatcher, TargetRule
from spacy.language import Language
from spacy.util import filter_spans

from .names import Term, name_key

# medspaCy's matchers each hold a token Matcher, empty when every rule is a literal, and spaCy warns of an
# empty one at every call
warnings.filterwarnings("ignore", message=r"\[W036\]")

RULES_PATH = Path(__file__).with_name("context_rules.json")
BATCH_SIZE = 64  # reports per nlp.pipe batch
_CONCEPT_LABEL = "CONCEPT"


@Language.factory("gateway_concept_mentions")
class _ConceptMentions:
    """The mentions of the names the TargetMatcher was given, as doc.ents: the longest of overlapping ones."""

    def __init__(self, nlp, name):
        self.matcher = TargetMatcher(nlp, name=name, prune=False, result_type=None)

    def __call__(self, doc):
        doc.ents = filter_spans(self.matcher(doc))
        return doc


@Language.component("gateway_paragraph_breaks")
def _paragraph_breaks(doc):
    """A blank line starts a sentence (after the sentencizer, which ends them at full stops only)."""
    for token in doc[:-1]:
        if token.is_space and token.text.count("\n") > 1:
            doc[token.i + 1].is_sent_start = True
    return doc


class Annotator:
    """Annotates report text with the concepts of `terms`; the pipeline is built once, here."""

    def __init__(self, terms: Iterable[Term], rules_path: Path | None = None):
        self._concepts_of_name = {}  # name key -> {cui: (pref, sty)}, in the order the terms came
        for term in terms:
            key = name_key(term.name)
            if key:
                self._concepts_of_name.setdefault(key, {}).setdefault(term.cui, (term.pref, term.sty))
        self._nlp = spacy.blank("en")
        self._nlp.add_pipe("sentencizer")
        self._nlp.add_pipe("gateway_paragraph_breaks")
        mentions = self._nlp.add_pipe("gateway_concept_mentions")
        mentions.matcher.add([TargetRule(key, _CONCEPT_LABEL) for key in self._concepts_of_name])
        self._nlp.add_pipe("medspacy_context", config={"rules": str(rules_path or RULES_PATH)})

    def annotate(self, text: str) -> list[dict]:
        """The annotations of one report, in the order of their mentions."""
        return self._annotations(self._nlp(text))

    def annotate_many(self, texts: Iterable[str]) -> Iterator[list[dict]]:
        """annotate() of each text, in order, processed in batches."""
        for doc in self._nlp.pipe(texts, batch_size=BATCH_SIZE):
            yield self._annotations(doc)

    def _annotations(self, doc):
        annotations = []
        for mention in doc.ents:
            qualifiers = {
                "negation": "Negated" if mention._.is_negated else "Affirmed",
                "experiencer": "Other" if mention._.is_family else "Patient",
                "temporality": "hypothetical" if mention._.is_hypothetical
                else "historical" if mention._.is_historical else "Recent",
            }
            for cui, (pref, sty) in self._concepts_of_name[mention._.target_rule.literal].items():
                annotations.append({
                    "cui": cui, "pref": pref, "str": mention.text, "sty": sty,
                    "start": mention.start_char, "end": mention.end_char, **qualifiers,
                })
        return annotations


# --- quality, against a hand-annotated gold set (bench/annotator.py --gold, tests/test_annotator.py) ---

# What each qualifier score counts: the values that are not what an unmodified mention says.
QUALIFIER_SCORES = {
    "negation": ("negation", {"Negated"}),
    "experiencer": ("experiencer", {"Other"}),
    "temporality": ("temporality", {"historical", "hypothetical"}),
    "temporality historical": ("temporality", {"historical"}),
    "temporality hypothetical": ("temporality", {"hypothetical"}),
}


class Score(NamedTuple):
    """Counts of one measure, and their precision, recall and F1."""

    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self):
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self):
        expected = self.true_positives + self.false_negatives
        return self.true_positives / expected if expected else 1.0

    @property
    def f1(self):
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0

    def __str__(self):
        return (f"P {self.precision:.3f}  R {self.recall:.3f}  F1 {self.f1:.3f}  "
                f"(TP {self.true_positives}, FP {self.false_positives}, FN {self.false_negatives})")


def read_gold(path):
    """The sentences of a gold file: JSON lines of `doc`, `text` and `annotations` (`cui`, `str`, `start`, `end`,
    `negation`, `experiencer`, `temporality`)."""
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def gold_scores(gold, annotator):
    """The annotator's Score on the gold sentences: "concepts" (the same cui on the same span), then each of
    QUALIFIER_SCORES over the mentions found in both."""
    counts = {name: [0, 0, 0] for name in ("concepts", *QUALIFIER_SCORES)}
    for sentence, found in zip(gold, annotator.annotate_many(item["text"] for item in gold)):
        expected = {(item["cui"], item["start"], item["end"]): item for item in sentence["annotations"]}
        found = {(item["cui"], item["start"], item["end"]): item for item in found}
        both = expected.keys() & found.keys()
        counts["concepts"][0] += len(both)
        counts["concepts"][1] += len(found.keys() - both)
        counts["concepts"][2] += len(expected.keys() - both)
        for key in both:
            for name, (qualifier, values) in QUALIFIER_SCORES.items():
                gold_value, found_value = expected[key][qualifier], found[key][qualifier]
                if gold_value == found_value:
                    counts[name][0] += gold_value in values
                else:
                    counts[name][1] += found_value in values
                    counts[name][2] += gold_value in values
    return {name: Score(*numbers) for name, numbers in counts.items()}
