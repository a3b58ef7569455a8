"""VQA accuracy exactly as the official evaluator computes it (github.com/GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, the Python 3 version), as pure functions.

    scores = accuracy(["2", "yes"], [["2"] * 10, ["yes", "no", ...]])   # one score per question, in [0, 1]
    vqa_accuracy = scores.mean()

Per question, the official protocol:
  * the predicted answer: newlines / tabs -> spaces, stripped, then `process_punctuation` and
    `process_digit_article` (lowercase, number words -> digits, articles dropped, contractions);
  * the human answers: only when they are not all identical, `process_punctuation` alone (not the digit / article
    step: the annotations are already lowercased and digit-normalised, and this is what the official code does);
  * the score: for each of the N human answers, min(#other humans who gave the predicted answer / 3, 1), averaged
    over the N leave-one-out subsets (N = 10 in VQAv2). So 1 matching human scores 0.3, 2 score 0.6, 3 score 0.9,
    4 or more score 1.0.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# The tables and regular expressions of the official VQA evaluation (github.com/GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), verbatim.

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
# Sic: "(?!<=\d)" is a negative lookahead (not the intended lookbehind), so the official code drops every period
# not followed by a digit ("2.5" keeps its period, "dog." loses it). Reproduced as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE as `count` (= 32 replacements at most); kept for fidelity.
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it ("Two" -> "2", "the dog." -> "dog")."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def accuracy(predicted: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> np.ndarray:
    """The official VQA accuracy of each predicted answer against its question's human answers: float [Q]."""
    if len(predicted) != len(gt_answers):
        raise ValueError(f"{len(predicted)} predicted answers for {len(gt_answers)} questions")
    scores = np.zeros(len(predicted), np.float64)
    for q, (answer, humans) in enumerate(zip(predicted, gt_answers)):
        humans = list(humans)
        if not humans:
            raise ValueError(f"question {q} has no human answers")
        answer = normalize_answer(answer)
        if len(set(humans)) > 1:
            humans = [process_punctuation(h) for h in humans]
        matches = [h == answer for h in humans]
        total = sum(matches)
        # Leave each human out in turn: the others' matches are total minus that human's own.
        scores[q] = np.mean([min(1.0, (total - own) / 3.0) for own in matches])
    return scores
