"""COCO caption metrics against pycocoevalcap, the reference implementation (a test-only dependency).

pycocoevalcap is imported inside each test that needs it, without importorskip: a missing install fails those tests.
Scores must agree to a relative tolerance of 1e-9 (REL).
"""

import shutil

import pytest

from mmjax.evaluation import captioning

REL = 1e-9

# Tokenised references and candidates chosen to hit the protocol's quirks (comments say which).
REFS = {
    # Candidate shorter than every reference; "a" and "on" occur in every image's references (idf 0).
    "short": [["a", "man", "riding", "a", "brown", "horse", "on", "a", "beach"],
              ["a", "person", "on", "a", "horse", "near", "the", "ocean"],
              ["a", "man", "on", "a", "horse", "walking", "along", "the", "sand", "at", "sunset"]],
    # Candidate longer than both references; repeated "a dog" n-grams that clipping caps at the reference counts.
    "long": [["a", "dog", "on", "a", "couch"], ["a", "dog", "and", "a", "dog", "on", "a", "sofa"]],
    # A 5-word candidate between a 4- and a 6-word reference: "closest" ties, and the shorter one is taken.
    "tie": [["a", "cat", "on", "mat"], ["a", "black", "cat", "sits", "on", "mat"]],
    # One reference only; the candidate shares unigrams and bigrams but no 4-gram.
    "no4gram": [["a", "red", "bus", "on", "a", "city", "street"]],
    # One-word candidate (no 2-, 3- or 4-grams at all), five references.
    "oneword": [["a", "giraffe", "on", "a", "plain"], ["a", "giraffe", "eating", "leaves"],
                ["tall", "giraffe", "on", "a", "plain"], ["a", "giraffe", "standing", "on", "grass"],
                ["one", "giraffe", "a", "tree", "and", "a", "plain", "on", "a", "sunny", "day"]],
    # Exact copy of a reference; the other reference is one word long.
    "exact": [["a", "plate", "of", "food", "on", "a", "table"], ["food"]],
    # A candidate with no token in any reference (document frequency 0 -> log(max(1, 0)) = 0).
    "unseen": [["a", "clock", "tower", "on", "a", "building"], ["a", "tall", "clock", "on", "a", "tower"]],
    # An empty candidate (a model can emit nothing).
    "empty": [["a", "boat", "on", "a", "lake"], ["boats", "on", "a", "lake"]],
}
CANDS = {
    "short": ["a", "man", "on", "a", "horse"],
    "long": ["a", "dog", "a", "dog", "a", "dog", "on", "a", "couch", "with", "a", "dog", "on", "a", "couch"],
    "tie": ["a", "cat", "on", "the", "mat"],
    "no4gram": ["a", "red", "bus", "in", "city", "street"],
    "oneword": ["giraffe"],
    "exact": ["a", "plate", "of", "food", "on", "a", "table"],
    "unseen": ["zebra", "grazing", "quietly"],
    "empty": [],
}

# Tricky plain-ASCII captions for the tokenizer (each a line of pycocoevalcap's batch, none the last one).
SENTENCES = [
    "A man riding a horse on the beach.",
    "A man don't like it. He can't; it's the cats' toy.",
    "won't shan't ain't isn't couldn't didn't haven't I'm you're we've they'll she'd",
    "Don'T DON'T It'S I'M WE'RE cannot Cannot gonna wanna gotta",
    "a man's hat. the kids' toys. McDonald's sign, dogs'. it's' dogs''",
    "o'clock rock 'n' roll O'Brien the '80s and 90's ma'am y'all",
    "\"hello,\" she said. \"bye\" 'hello' he said 'bye' a 'b c' d ``x'' `y'",
    "The (small) [red] {blue} dog... runs -- fast - away ( ) () [] {}",
    "a - b -- c --- d ---- e ----- f",
    "black-and-white 3.5 1,000 $5 50% a/b 1/2 5 7/8 x*y & AT&T at&t R&B 10:30am",
    "3-way 5-6 -5 +5 2.5-inch 1st 2nd 10am 100-year-old 4x4 x-ray re-enter u.s.-made",
    "a_b a__b _a #1 ## @@ ** * a*b = + < > ~ ^ | \\",
    "and/or w/ w/o a/b/c 12/25/2014 1-2-2014",
    "the dog. the dog .. the dog . . . the dog.... the dog...... end",
    "What?! Really!? yes!!! a?b a,b a.b a:b a;b ?. !.",
    "Mr. Smith went to the U.S. He saw the U.S. and St. Paul at 10 a.m. etc. vs. Dr. Jones",
    "st. mt. dr. mr mrs. etc. vs. inc. co. ave. jr. no. ft. sq. a. b. z. x. rd. col. Mass. mass. Ill. ill.",
    "e.g. i.e. a.m p.m. t.v. tv. a.b.c A.B.C Ph.D. no. 5 No.5",
    "a dog., cat.; fish.: bird 3-way., 2.5-inch., 5., dog.cat,",
    "a.dog dog.cat.fish dog.5 5.dog dog.cat. the end.The start twenty.five",
    "multiple   spaces\tand a tab",
    "a line\nwith a newline inside",
    "   leading and trailing spaces   ",
    "a...b a..b 3.5. 5. .5 1,000,000 -5-6 --5 5- a-b- -a",
    "'tis 'twas 'em 'til 'cause s'mores li'l ol' pro- anti- pro-choice",
    "#tag @user a@b.com http://x.com/a?b=c. US$5 :) ;-) =p",
    "",
    "...",
    "A BLACK AND WHITE PHOTO OF A CAT SITTING ON A TOILET SEAT.",
]


def _gts(refs):
    return {k: [" ".join(r) for r in v] for k, v in refs.items()}


def _res(cands):
    return {k: [" ".join(c)] for k, c in cands.items()}


def _require_java():
    if shutil.which("java") is None:
        pytest.fail("java not found: pycocoevalcap's PTBTokenizer needs it; install default-jre-headless")


def test_bleu_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    want, _ = Bleu(4).compute_score(_gts(REFS), _res(CANDS), verbose=0)
    assert captioning.bleu(REFS, CANDS) == pytest.approx(want, rel=REL, abs=0)
    for name in CANDS:  # every image on its own too: brevity penalties, zero counts, the tie
        want, _ = Bleu(4).compute_score(_gts({name: REFS[name]}), _res({name: CANDS[name]}), verbose=0)
        assert captioning.bleu({name: REFS[name]}, {name: CANDS[name]}) == pytest.approx(want, rel=REL, abs=0)


def test_bleu_closest_tie_takes_shorter_reference():
    # 5 candidate words vs references of 4 and 6: the 4 is taken, so there is no brevity penalty.
    one = {"tie": REFS["tie"]}, {"tie": CANDS["tie"]}
    no_penalty = captioning.bleu({"tie": [REFS["tie"][0]]}, one[1])
    assert captioning.bleu(*one) == pytest.approx(no_penalty, rel=REL, abs=0)


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    want, want_per_image = Cider().compute_score(_gts(REFS), _res(CANDS))
    assert captioning.cider_d(REFS, CANDS) == pytest.approx(want, rel=REL, abs=0)
    per_image = captioning.cider_d_per_image(REFS, CANDS)
    assert list(per_image) == list(CANDS)
    assert list(per_image.values()) == pytest.approx(list(want_per_image), rel=REL, abs=0)
    assert per_image["unseen"] == 0.0 and per_image["empty"] == 0.0 and per_image["exact"] > 1.0


def test_cider_d_subsets_and_single_image_match_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    # Document frequencies come from the evaluated images only, so subsets score differently; one image scores 0.
    for names in (["short", "long"], ["tie", "no4gram", "oneword"], ["exact"]):
        refs, cands = {k: REFS[k] for k in names}, {k: CANDS[k] for k in names}
        want, want_per_image = Cider().compute_score(_gts(refs), _res(cands))
        assert captioning.cider_d(refs, cands) == pytest.approx(want, rel=REL, abs=0)
        assert list(captioning.cider_d_per_image(refs, cands).values()) == pytest.approx(
            list(want_per_image), rel=REL, abs=0)
    assert captioning.cider_d({"exact": REFS["exact"]}, {"exact": CANDS["exact"]}) == 0.0


def test_tokenize_matches_java_ptbtokenizer():
    _require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # A plain last caption: the batch file's final line ends at EOF, which lexes a few tokens differently.
    captions = {i: [{"caption": s}] for i, s in enumerate(SENTENCES + ["end"])}
    java = PTBTokenizer().tokenize(captions)
    for i, sentence in enumerate(SENTENCES):
        assert captioning.tokenize(sentence) == java[i][0].split(), sentence


def test_tokenize_examples():
    assert captioning.tokenize("A man don't like the cats' (red) toy...") == [
        "a", "man", "do", "n't", "like", "the", "cats", "-lrb-", "red", "-rrb-", "toy"]
    assert captioning.tokenize("Black-and-white 3.5 -- \"it's\" Mr. Smith.") == [
        "black-and-white", "3.5", "it", "'s", "mr.", "smith"]


def test_score_matches_full_pycocoevalcap_pipeline():
    _require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {
        "1": ["A man riding a horse on the beach.", "A person on a brown horse, near the ocean!",
              "The man's horse walks along the sand (at sunset)."],
        "2": ["Two dogs don't play in the snow.", "Two black-and-white dogs playing... in the snow"],
        "3": ["A \"red\" bus on a city street.", "A RED DOUBLE-DECKER BUS ON A STREET", "a bus; it's red",
              "A bus -- red -- parked on the street.", "Red bus at 10:30 a.m. on Main St."],
        "4": ["A cat sits on a mat.", "The cat's mat is blue."],
    }
    candidates = {"1": "A man on a horse.", "2": "two dogs in the snow", "3": "A red bus on the street...",
                  "4": "a cat on a mat"}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    got = captioning.score(references, candidates)
    assert [got[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(bleu, rel=REL, abs=0)
    assert got["CIDEr"] == pytest.approx(cider, rel=REL, abs=0)
    per_image = captioning.cider_per_image(references, candidates)
    assert list(per_image) == list(gts)
    assert list(per_image.values()) == pytest.approx(list(cider_per_image), rel=REL, abs=0)


@pytest.mark.parametrize("references, candidates, message", [
    ({"a": ["a dog"]}, {"a": "a dog", "b": "a cat"}, "candidate id"),
    ({"a": ["a dog"], "b": ["a cat"]}, {"a": "a dog"}, "reference id"),
    ({"a": []}, {"a": "a dog"}, "non-empty list"),
    ({"a": "a dog"}, {"a": "a dog"}, "non-empty list"),
    ({"a": ["a dog"]}, {"a": None}, "must be strings"),
    ({"a": ["a dog", 3]}, {"a": "a dog"}, "must be strings"),
    ({"a": ["a dog"]}, {"a": ["a", "dog"]}, "must be strings"),
    ([["a dog"]], {"a": "a dog"}, "dicts"),
    ({}, {}, "no candidates"),
])
def test_score_rejects_bad_input(references, candidates, message):
    for fn in (captioning.score, captioning.cider_per_image):
        with pytest.raises(ValueError, match=message) as err:
            fn(references, candidates)
        assert "\n" not in str(err.value)


def test_token_level_metrics_reject_strings():
    with pytest.raises(ValueError, match="lists of tokens"):
        captioning.bleu({"a": [["a", "dog"]]}, {"a": "a dog"})
    with pytest.raises(ValueError, match="lists of tokens"):
        captioning.cider_d({"a": ["a dog"]}, {"a": ["a", "dog"]})
