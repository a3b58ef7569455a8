"""COCO caption metrics (BLEU-1..4, CIDEr-D) computed exactly as the standard COCO caption evaluation does.

Reproduces pycocoevalcap 1.2 (the pip packaging of coco-caption): its PTBTokenizer (Stanford CoreNLP 3.4.1
`PTBTokenizer -preserveLines -lowerCase`, then dropping the tokens in its PUNCTUATIONS list), `Bleu(4)` (corpus
BLEU, "closest" reference length) and `Cider()` (which is CIDEr-D: clipped tf-idf n-grams, Gaussian length penalty).
`score(references, candidates)` runs the whole pipeline on raw strings; `bleu` and `cider_d` take token lists.

Protocol facts worth knowing: -lowerCase also lower-cases -LRB-/-RRB-/-LSB-/..., so brackets survive as "-lrb-"
etc. (PUNCTUATIONS only lists the upper-case forms); "?!", "!!!" and "-----" survive too; abbreviations keep their
period ("mr.", "st.", "u.s.", "a."); CIDEr-D's idf comes from the references of the evaluated images alone, with
log(number of images) as the "reference length", so on one image every weight, hence CIDEr, is 0.

Where this differs: `tokenize` is a small regex lexer (no Java) that matches the Java one on plain ASCII caption
text, including contractions, quotes, brackets, abbreviations, hyphenated words and numbers. Not reproduced: URLs
other than http(s)://, phone numbers, SGML entities, some rare apostrophe forms and emoticons, and the few tokens that
depend on the next caption or on being the last line of the batch (a final "we're" gives "we re" there; here
"we 're"). Non-ASCII text is best effort: curly quotes, en/em dashes and "\u2026" are mapped to ASCII first and
other letters count as letters. pycocoevalcap writes one caption per line, so a caption containing "\\r" shifts
every later caption onto the wrong image there; here "\\r" is a space. `bleu` also accepts n > 4 (pycocoevalcap
fails there). Per-image CIDEr-D: `cider_per_image` (raw strings), `cider_d_per_image` (tokens).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

# Tokens pycocoevalcap drops after tokenising (its upper-case -LRB- etc. never match lower-cased output).
_PUNCTUATIONS = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# Words the 3.4.1 lexer keeps with their period (found by probing the jar); the cased ones only when capitalised.
_ABBREVIATIONS = """adm al ala alex apr ariz assn atty attys aug ave bancorp bhd blvd brig bros calif capt cf cie
cmdr co col colo comdr conn corp cos cpl ct dak dec dept det dr drs elec esq est etc ext feb fla fri ft ga gen gov
govs hon inc ind intl invt jan jos jr jul jun kan kans ky lieut lt ltd maj mar md messrs mfg mich minn mo mon mont mr
mrs ms mt mtg natl neb nev nov oct okla penn pfc ph plc pres prof profs pty ptys ppty pptys pvt rd rep reps rev sen
sens sep sept seq sgt spc sq sr st ste supt supts sys tel tenn thu thurs treas tue tues univ va vs vt wed wis wisc
wm wyo ph.d ed.d""".split()
_CASED_ABBREVIATIONS = "Ark Del Ill La Mass Miss Ore Pa Tex Wash".split()
# Longest first: a regex alternation takes the first alternative that fits ("ph." would shadow "ph.d.").
_ABBREVIATION_WORDS = [re.escape(a) for a in sorted(_ABBREVIATIONS, key=len, reverse=True)] + [
    f"(?-i:{a[0]}){a[1:]}" for a in _CASED_ABBREVIATIONS]

_L, _N = r"[^\W\d_]", r"[^\W_]"  # a letter; a letter or digit
_THING = rf"(?:[dol]'{_N})?{_N}+(?:[-_](?:[dol]'{_N})?{_N}+)*"  # hyphenated words, "o'clock", "a_b"
_DOTTED = rf"{_L}{_N}*(?:\.{_L}{_N}*)+"  # "a.b.c", "dog.cat" (a missing space)
_HTHING = rf"{_N}(?:{_N}|[.,])*(?:-(?:{_L}(?:\.{_L})+\.|{_N}+))+"  # "2.5-inch", "u.s.-made"
# The Java lexer takes the longest match at each position, counting its trailing context (the text after group t,
# which is then lexed again), and on a tie the earliest rule. Each rule is one alternative of that lexer.
_RULES = [re.compile(r, re.IGNORECASE) for r in [
    *(rf"(?P<t>{a}){b}" for a, b in [("can", "not"), ("gon", "na"), ("wan", "na"), ("got", "ta"), ("lem", "me"),
                                      ("gim", "me"), ("'t", "is"), ("'t", "was")]),
    rf"(?P<t>{_L}+)'(?:[msd]|re|ve|ll)",  # "it's" -> it 's
    rf"(?P<t>{_L}*[a-mo-z])n't",  # "don't" -> do n't, "can't" -> ca n't
    rf"{_L}+",
    r"'n'?|[ldj]'|'em|'till?|'cause|'[2-9]0s|s'mores|li'l|nor'easter|e'er|ev'ry|nat'l|c'mon|cap'n|c'est|dunkin'|"
    rf"somethin'|ol'|(?-i:[A-HJ-XZn])'{_L}{{2,}}|{_L}+[aeiouy]'(?-i:[aeiouA-Z]){_L}*",
    rf"(?P<t>y'){_L}",
    rf"(?P<t>'(?:[msd]|re|ve|ll))(?!{_L})(?s:.)",
    r"n't",
    r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)",
    r"(?:\d{1,4}-)?\d{1,4}/\d{1,4}",
    r"pro-|anti-",
    rf"{_N}+(?:-{_L}+){{0,2}}(?:/{_N}+(?:-{_L}+){{0,2}}){{1,2}}",  # "and/or", "w/o"
    r"(?-i:[A-Z]*)\$",
    "(?:" + "|".join(_ABBREVIATION_WORDS) + rf"|{_L})\.",  # "mr.", "st.", "a."
    r"(?P<t>nos?\.) ?\d",
    rf"{_L}(?:\.{_L})+\.",  # "u.s."
    _DOTTED,
    rf"(?P<t>(?:{_THING}|{_DOTTED}|{_HTHING})\.)[,;:]",  # the lexer keeps "dog." whole before , ; :
    _HTHING,
    _THING,
    r"(?-i:[A-Z]+(?:[+&][A-Z]+)+)",  # "AT&T"
    rf"{_L}+(?:[?!]{_L}+)+",  # "a?b"
    rf"#{_L}+|@(?:{_L}|_)\w*",  # hashtags, @user
    r"(?P<t>[:;=]-?[()dp])[^a-z0-9]",  # emoticons
    r"https?://[^\s\"<>|()]+[^\s\"<>|.!?(){},-]",
    rf"{_N}[^\s\"<>|()]*@[^\s\"<>|().]+(?:\.[^\s\"<>|().]+)*",  # e-mail
    r"</?[a-z!?][^>\r\n]*>",  # SGML-ish tags stay whole
    rf"(?P<t>'){_L}\S",  # an opening quote
    r"'(?:[msd]|re|ve|ll)",
    r"(?P<t>'\d\d)\s",  # "'80"
    r"''|'|`{1,2}|\"",
    r"\.{3,5}|(?:\. ){2,4}\.",
    r"-+|[?!]+|@+|#+|_+|\*+|&amp;|[,;:.=+%&~^|\\<>/(){}\[\]]",
]]
_NORMALISE = {"[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''", "&amp;": "&", "---": "--",
              "----": "--"}
_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
                          "\u2026": "...", "\u2013": "--", "\u2014": "--", "\u00a0": " "})


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens of `text` as pycocoevalcap's PTBTokenizer (+ punctuation removal) gives them."""
    # Lex as a caption followed by another line: the last line of pycocoevalcap's batch file ends at EOF instead,
    # which changes a few tokens (e.g. a final "we're" gives "we re" there).
    text = text.translate(_UNICODE) + "\n"
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        best = max((m for rule in _RULES if (m := rule.match(text, pos))), key=lambda m: m.end(), default=None)
        if best is None:  # the Java lexer deletes characters it cannot tokenise
            pos += 1
            continue
        token = best.group("t") if "t" in best.re.groupindex else best.group()
        pos += len(token)
        token = token.lower().replace("(", "-lrb-").replace(")", "-rrb-")
        token = _NORMALISE.get(token, "..." if re.fullmatch(r"\.[. ]+", token) else token)
        if token not in _PUNCTUATIONS:
            tokens.append(token)
    return tokens


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram (as tuples) of `tokens`."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _check(references: Mapping, candidates: Mapping, kind: type | tuple[type, ...]) -> None:
    """Raises a one-line ValueError unless the two dicts share their ids and hold captions of type `kind`."""
    if not isinstance(references, Mapping) or not isinstance(candidates, Mapping):
        raise ValueError("references and candidates must be dicts keyed by image id")
    if not candidates:
        raise ValueError("no candidates to score")
    if missing := [k for k in candidates if k not in references]:
        raise ValueError(f"{len(missing)} candidate id(s) have no references, e.g. {missing[0]!r}")
    if extra := [k for k in references if k not in candidates]:
        raise ValueError(f"{len(extra)} reference id(s) have no candidate, e.g. {extra[0]!r}")
    what = "strings" if kind is str else "lists of tokens"
    for key, refs in references.items():
        if isinstance(refs, (str, bytes)) or not isinstance(refs, Sequence) or not refs:
            raise ValueError(f"image {key!r}: references must be a non-empty list of captions")
        if not isinstance(candidates[key], kind) or not all(isinstance(r, kind) for r in refs):
            raise ValueError(f"image {key!r}: the candidate and each reference must be {what}")


def bleu(references: Mapping[str, Sequence[Sequence[str]]], candidates: Mapping[str, Sequence[str]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised candidates (one per image) against tokenised references, as pycocoevalcap."""
    _check(references, candidates, (list, tuple))
    # pycocoevalcap's constants: `tiny` keeps a zero match count at ~0 instead of dividing 0 by 0, `small` guards /0.
    tiny, small = 1e-15, 1e-9
    correct, guess, cand_len, ref_len = [0] * n, [0] * n, 0, 0
    for key, cand in candidates.items():
        refs = references[key]
        max_ref = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)  # union keeps each n-gram's largest count: the clipping limit
        for gram, count in _ngrams(cand, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        # "closest" reference length; a tie goes to the shorter reference.
        ref_len += min((abs(len(ref) - len(cand)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (cand_len + tiny) / (ref_len + small)
    penalty = math.exp(1.0 - 1.0 / ratio) if ratio < 1 else 1.0  # brevity penalty on the corpus totals
    return [s * penalty for s in scores]


def cider_d_per_image(references: Mapping[str, Sequence[Sequence[str]]],
                      candidates: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """CIDEr-D of each image's tokenised candidate against its tokenised references, as pycocoevalcap's Cider."""
    _check(references, candidates, (list, tuple))
    n, sigma = 4, 6.0
    ref_grams = {key: [_ngrams(ref, n) for ref in references[key]] for key in candidates}
    # Document frequency: in how many images' reference sets an n-gram occurs (only the images evaluated here).
    doc_freq = Counter(gram for grams in ref_grams.values() for gram in set().union(*grams))
    log_images = math.log(len(candidates))

    def vector(grams: Counter) -> tuple[list[dict], list[float]]:
        """tf-idf weights split by n-gram order, and their Euclidean norms."""
        vec = [{} for _ in range(n)]
        for gram, count in grams.items():
            vec[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, doc_freq[gram])))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    scores = {}
    for key, cand in candidates.items():
        cand_vec, cand_norm = vector(_ngrams(cand, n))
        total = [0.0] * n
        for ref, grams in zip(references[key], ref_grams[key]):
            ref_vec, ref_norm = vector(grams)
            # pycocoevalcap measures length in bigrams; that equals the word-count difference whenever it matters.
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                # The candidate's weight is clipped at the reference's (the "D" in CIDEr-D), the reference's is not.
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in cand_vec[k].items())
                if cand_norm[k] and ref_norm[k]:
                    dot /= cand_norm[k] * ref_norm[k]
                total[k] += dot * penalty
        scores[key] = sum(total) / n / len(references[key]) * 10.0
    return scores


def cider_d(references: Mapping[str, Sequence[Sequence[str]]], candidates: Mapping[str, Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_per_image` (pycocoevalcap's "CIDEr")."""
    return float(np.mean(list(cider_d_per_image(references, candidates).values())))


def _tokenized(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> tuple[dict, dict]:
    _check(references, candidates, str)
    return ({key: [tokenize(r) for r in references[key]] for key in candidates},
            {key: tokenize(c) for key, c in candidates.items()})


def score(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr of raw caption strings (one candidate per image), tokenised with `tokenize` first."""
    refs, cands = _tokenized(references, candidates)
    result = {f"BLEU-{k + 1}": s for k, s in enumerate(bleu(refs, cands))}
    result["CIDEr"] = cider_d(refs, cands)
    return result


def cider_per_image(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Per-image CIDEr-D of raw caption strings (their mean is `score(...)["CIDEr"]`)."""
    return cider_d_per_image(*_tokenized(references, candidates))
